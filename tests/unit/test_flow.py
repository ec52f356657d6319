"""Path, samplers and time utilities against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgm_jax import fgm
from fgm_jax import flow

MU, SIGMA = 0.7, 0.4


def gaussian_field(x, t):
  """Exact rectified-flow velocity for data N(MU, SIGMA²) (see test_fgm_closed_form.py)."""
  t = t[:, None]
  c = (t - (1 - t) * SIGMA**2) / ((1 - t) ** 2 * SIGMA**2 + t**2)
  return -MU + c * (x - (1 - t) * MU)


def test_path_endpoints_and_clean_estimate():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  x0, eps = jax.random.normal(k1, (5, 3)), jax.random.normal(k2, (5, 3))
  t = jnp.array([0.0, 0.25, 0.5, 0.75, 1.0])
  xt = flow.interpolate(x0, eps, t)
  np.testing.assert_allclose(xt[0], x0[0]), np.testing.assert_allclose(xt[-1], eps[-1])
  # With the exact conditional velocity, x0_hat recovers x0 at every t.
  np.testing.assert_allclose(flow.clean_estimate(xt, t, flow.conditional_velocity(x0, eps)),
                             x0, atol=1e-6)


def test_euler_single_step_is_exact_for_a_point_mass():
  """Data = delta at MU: v(x, t) = (x - MU) / t, straight trajectories, one step is exact."""
  z = jax.random.normal(jax.random.PRNGKey(1), (16, 2))
  out = flow.euler_sample(lambda x, t: (x - MU) / t[:, None], z, steps=1)
  np.testing.assert_allclose(out, MU, atol=1e-6)


def _error(sampler, steps, z):
  exact = MU + SIGMA * z  # the Gaussian probability flow maps z affinely
  return float(jnp.max(jnp.abs(sampler(gaussian_field, z, steps) - exact)))


def test_samplers_converge_at_their_order():
  z = jnp.linspace(-2, 2, 9)[:, None]
  e_euler = [_error(flow.euler_sample, n, z) for n in (20, 40)]
  e_heun = [_error(flow.heun_sample, n, z) for n in (20, 40)]
  assert e_euler[1] < 0.05 and e_heun[1] < 1e-3
  assert 1.7 < e_euler[0] / e_euler[1] < 2.3  # first order
  assert 3.4 < e_heun[0] / e_heun[1] < 4.6  # second order


def test_sample_dispatch_and_shift():
  z = jnp.ones((2, 1))
  np.testing.assert_allclose(flow.sample(gaussian_field, z, 8, "heun"),
                             flow.heun_sample(gaussian_field, z, 8))
  with pytest.raises(ValueError, match="unknown sampler"):
    flow.sample(gaussian_field, z, 8, "rk45")
  ts = flow.time_grid(10, shift=3.0)
  assert float(ts[0]) == 1.0 and float(ts[-1]) == 0.0 and bool(jnp.all(jnp.diff(ts) < 0))
  np.testing.assert_allclose(flow.shift_time(jnp.array(0.5), 3.0), 0.75)
  np.testing.assert_allclose(flow.shift_time(jnp.array(0.3), 1.0), 0.3)


@pytest.mark.parametrize("kind", ["uniform", "logit_normal"])
def test_time_samplers_respect_range(kind):
  t = flow.sample_time(jax.random.PRNGKey(0), 4096, kind, t_min=0.1, t_max=0.9)
  assert float(t.min()) >= 0.1 and float(t.max()) <= 0.9
  assert 0.4 < float(t.mean()) < 0.6


def test_logit_normal_matches_its_density():
  t = flow.sample_time(jax.random.PRNGKey(0), 100_000, "logit_normal", logit_mean=1.0)
  logits = np.log(np.asarray(t) / (1 - np.asarray(t)))
  np.testing.assert_allclose([logits.mean(), logits.std()], [1.0, 1.0], atol=0.02)


def test_cfg_velocity():
  vu, vc = jnp.array([1.0]), jnp.array([3.0])
  np.testing.assert_allclose(flow.cfg_velocity(vu, vc, 1.0), vc)
  np.testing.assert_allclose(flow.cfg_velocity(vu, vc, 0.0), vu)
  np.testing.assert_allclose(flow.cfg_velocity(vu, vc, 2.0), 5.0)
  # One pass over the doubled batch; each example keeps its own t and conditioning.
  calls = []

  def net(x, t, c):
    calls.append(x.shape)
    return x * c["w"][:, None] + t[:, None]
  x, t = jnp.array([[1.0], [2.0], [3.0]]), jnp.array([0.1, 0.2, 0.3])
  cond, null = {"w": jnp.array([2.0, 4.0, 6.0])}, {"w": jnp.zeros(3)}
  got = flow.guided(net, cond=cond, null_cond=null, scale=3.0)(x, t)
  want = flow.cfg_velocity(net(x, t, null), net(x, t, cond), 3.0)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(got[:, 0], [6.1, 24.2, 54.3], rtol=1e-6)
  assert calls[0] == (6, 1)
  np.testing.assert_allclose(flow.sd3_timestep(jnp.array(0.25)), 250.0)


def test_generator_is_the_clean_estimate_at_t_star():
  z = jax.random.normal(jax.random.PRNGKey(3), (4, 2))
  v = lambda x, t: 0.5 * x + t[:, None]  # noqa: E731
  np.testing.assert_allclose(fgm.generator_sample(v, z, 1.0), z - (0.5 * z + 1.0), atol=1e-6)
  x_in = 0.8 * z
  np.testing.assert_allclose(fgm.generator_sample(v, z, 0.8),
                             x_in - 0.8 * (0.5 * x_in + 0.8), atol=1e-6)


def test_online_loss_is_zero_for_the_exact_conditional_field_and_stops_gradients():
  k1, k2 = jax.random.split(jax.random.PRNGKey(4))
  x0, eps = jax.random.normal(k1, (8, 2)), jax.random.normal(k2, (8, 2))
  t = jnp.linspace(0.1, 0.9, 8)
  # A "field" that knows the pairing reproduces eps - x0 exactly.
  loss = fgm.online_flow_loss(lambda x, tt: eps - x0, x0, eps, t)
  assert float(loss) == 0.0
  g = jax.grad(lambda s: fgm.online_flow_loss(lambda x, tt: x, s * x0, eps, t))(1.0)
  assert float(g) == 0.0  # generator samples enter the online loss as constants


def test_unknown_weighting_is_rejected():
  x = jnp.ones((2, 2))
  with pytest.raises(ValueError, match="sid_norm"):
    fgm.loss_weight("snr", jnp.ones(2), x, x, x)
