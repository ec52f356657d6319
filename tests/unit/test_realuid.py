"""RealUID's real-data supervision (config.fgm.real_data; fgm.py): its losses against FGM's
and against the closed-form minimiser of the online-flow loss, the step with real data on
one and eight devices, and the values refused before compiling."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fgm_jax import fgm
from fgm_jax import main as main_lib
from fgm_jax import sharding as sharding_lib
from fgm_jax.config_checks import ConfigError
from fgm_jax.models import mlp
from fgm_jax.train import trainers
from tests import helpers


def _linear_field(seed, dim):
  """A smooth velocity field v(x, t) = x W + t b, different per seed."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  w = jax.random.normal(k1, (dim, dim)) / np.sqrt(dim)
  b = jax.random.normal(k2, (dim,))
  return lambda x, t: x @ w + t[:, None] * b


def _draws(seed, n=64, dim=3):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  return (jax.random.normal(ks[0], (n, dim)), jax.random.normal(ks[1], (n, dim)) + 2.0,
          jax.random.normal(ks[2], (n, dim)), jax.random.uniform(ks[3], (n,)))


def test_alpha_beta_one_is_fgm_with_alpha_one_half():
  """alpha_r = beta_r = 1: the online loss is plain flow matching, the generator loss exactly
  twice FGM's with alpha = 0.5 (the reference's identity)."""
  x0, x0_real, eps, t = _draws(0)
  online, teacher = _linear_field(1, 3), _linear_field(2, 3)
  np.testing.assert_allclose(fgm.real_data_online_loss(online, x0, x0_real, eps, t, 1.0, 1.0),
                             fgm.online_flow_loss(online, x0, eps, t), rtol=1e-6)
  for weighting in fgm.WEIGHTINGS:
    ours = fgm.real_data_generator_loss(teacher, online, x0, eps, t, 1.0, 1.0, 0.5, weighting)
    plain = fgm.generator_loss(teacher, online, x0, eps, t, 0.5, weighting)
    np.testing.assert_allclose(ours, 2.0 * plain, rtol=1e-6)


def test_real_data_terms_follow_the_formula():
  """alpha_r, beta_r < 1, written out by hand from the reference's formulas."""
  x0, x0_real, eps, t = _draws(3)
  online, teacher = _linear_field(4, 3), _linear_field(5, 3)
  a_r, b_r = 0.8, 0.7
  xt, xt_real = (1 - t[:, None]) * x0 + t[:, None] * eps, (1 - t[:, None]) * x0_real + t[:, None] * eps
  fake = jnp.mean((online(xt, t) - (b_r / a_r) * (eps - x0)) ** 2, axis=1)
  real = jnp.mean((online(xt_real, t) - (1 - b_r) / (1 - a_r) * (eps - x0_real)) ** 2, axis=1)
  np.testing.assert_allclose(fgm.real_data_online_loss(online, x0, x0_real, eps, t, a_r, b_r),
                             jnp.mean(a_r * fake + (1 - a_r) * real), rtol=1e-5)
  a = teacher(xt, t) - online(xt, t)
  b = online(xt, t) - (b_r / a_r) * (eps - x0)
  by_hand = 2 * a_r * jnp.mean(jnp.mean(a * b, axis=1) + 0.5 * jnp.mean(a * a, axis=1))
  np.testing.assert_allclose(
      fgm.real_data_generator_loss(teacher, online, x0, eps, t, a_r, b_r, 0.5, "uniform"),
      by_hand, rtol=1e-5)


def _gaussian_flow(x, t, mean, std):
  """E[eps - x0 | x_t = x] for x0 ~ N(mean, std²), eps ~ N(0, 1), x_t = (1 - t) x0 + t eps."""
  m, var = (1 - t) * mean, (1 - t) ** 2 * std ** 2 + t ** 2
  return t * (x - m) / var - (mean + (1 - t) * std ** 2 * (x - m) / var)


def _gaussian_density(x, t, mean, std):
  m, var = (1 - t) * mean, (1 - t) ** 2 * std ** 2 + t ** 2
  return np.exp(-(x - m) ** 2 / (2 * var)) / np.sqrt(2 * np.pi * var)


def test_online_flow_approaches_the_closed_form_minimiser():
  """1-D: generated N(1, 0.5²), real N(-1, 0.7²). Trained with the real-data loss, the online
  flow approaches [b p v + (1 - b) p* v*] / [a p + (1 - a) p*] (the reference's minimiser),
  not the generated data's own flow (what data-free FGM's online flow learns)."""
  a_r, b_r = 0.7, 0.4
  gen, real = (1.0, 0.5), (-1.0, 0.7)
  model = mlp.MLPVelocity(hidden=64, depth=3, time_dim=16)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1)), jnp.zeros((1,)))["params"]
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state, key):
    ks = jax.random.split(key, 4)
    n = 1024
    x0 = gen[0] + gen[1] * jax.random.normal(ks[0], (n, 1))
    x0_real = real[0] + real[1] * jax.random.normal(ks[1], (n, 1))
    eps, t = jax.random.normal(ks[2], (n, 1)), jax.random.uniform(ks[3], (n,), maxval=0.9)
    v = lambda p: (lambda x, tt: model.apply({"params": p}, x, tt))
    loss, g = jax.value_and_grad(
        lambda p: fgm.real_data_online_loss(v(p), x0, x0_real, eps, t, a_r, b_r))(params)
    updates, opt_state = tx.update(g, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  for i in range(2500):
    params, opt_state, _ = step(params, opt_state, jax.random.PRNGKey(i))
  errors, own_flow = [], []
  for t in (0.2, 0.5, 0.8):
    x = np.linspace(-1.5, 1.5, 31)
    p, p_real = _gaussian_density(x, t, *gen), _gaussian_density(x, t, *real)
    v, v_real = _gaussian_flow(x, t, *gen), _gaussian_flow(x, t, *real)
    target = (b_r * p * v + (1 - b_r) * p_real * v_real) / (a_r * p + (1 - a_r) * p_real)
    learned = np.asarray(model.apply({"params": params}, x[:, None],
                                     np.full(x.shape, t, np.float32)))[:, 0]
    errors.append(np.mean(np.abs(learned - target)))
    own_flow.append(np.mean(np.abs(v - target)))
  assert max(errors) < 0.15, errors
  assert min(own_flow) > 3 * max(errors), (own_flow, errors)  # the test can tell them apart


def _config(real=True, online_steps=2, alpha_r=0.9, beta_r=0.92):
  c = helpers.tiny_fgm_config("unused", num_steps=3)
  c.fgm.alpha = 0.5
  c.fgm.online_steps = online_steps
  c.fgm.real_data.enabled = real
  c.fgm.real_data.alpha, c.fgm.real_data.beta = alpha_r, beta_r
  return c


def _run(config, mesh, teacher, steps=3):
  trainer = trainers.FGMTrainer(config, mesh, teacher_params=teacher)
  state, metrics = trainer.init_state(), []
  for i in range(steps):
    state, m = trainer.train_step(state, i)
    metrics.append({k: float(v) for k, v in m.items()})
  trainer.close()
  return jax.device_get(state), metrics


@pytest.fixture(scope="module")
def teacher():
  layout = trainers.FGMTrainer(_config(), sharding_lib.make_mesh(1, 1, 1, jax.devices()[:1]))
  return jax.tree.map(lambda a: 0.3 * jax.random.normal(jax.random.PRNGKey(7), a.shape),
                      layout.abstract_teacher)


def test_step_with_alpha_beta_one_equals_fgm_alpha_one_half(teacher):
  """Through the trainer (real batches read and passed): same online updates, generator loss
  doubled; Adam normalises the doubled gradient, so the weights agree closely."""
  one = sharding_lib.make_mesh(1, 1, 1, jax.devices()[:1])
  s_real, m_real = _run(_config(alpha_r=1.0, beta_r=1.0), one, teacher, steps=1)
  s_free, m_free = _run(_config(real=False), one, teacher, steps=1)
  np.testing.assert_allclose(m_real[0]["online_loss"], m_free[0]["online_loss"], rtol=1e-6)
  np.testing.assert_allclose(m_real[0]["generator_loss"], 2 * m_free[0]["generator_loss"],
                             rtol=1e-5)
  for x, y in zip(jax.tree.leaves(s_real.online_params), jax.tree.leaves(s_free.online_params)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)  # the same loss, the same update
  # Adam divides by sqrt(second moment) + eps: twice the gradient moves an update only where
  # the gradient is near eps, by a small fraction of the lr-sized step.
  lr = _config().optim.lr
  for x, y in zip(jax.tree.leaves(s_real.gen_params), jax.tree.leaves(s_free.gen_params)):
    np.testing.assert_allclose(x, y, rtol=0, atol=0.5 * lr)
    assert np.mean(np.abs(x - y) > 1e-6) < 0.05


@pytest.mark.skipif(jax.device_count() < 8,
                    reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
def test_real_data_step_on_eight_devices_equals_one(teacher):
  s8, m8 = _run(_config(), sharding_lib.make_mesh(-1, 1, 1), teacher)
  s1, m1 = _run(_config(), sharding_lib.make_mesh(1, 1, 1, jax.devices()[:1]), teacher)
  for a, b in zip(m8, m1):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7, err_msg=k)
  for x, y in zip(jax.tree.leaves(s8), jax.tree.leaves(s1)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
  # and the real data changed the run (alpha_r, beta_r < 1 differ from data-free FGM)
  s_free, _ = _run(_config(real=False), sharding_lib.make_mesh(1, 1, 1, jax.devices()[:1]),
                   teacher)
  moved = max(float(np.max(np.abs(x - y))) for x, y in
              zip(jax.tree.leaves(s1.online_params), jax.tree.leaves(s_free.online_params)))
  assert moved > 1e-5


@pytest.mark.parametrize("change, fragment", [
    (dict(alpha_r=1.0, beta_r=0.9), "alpha=1 with beta=0.9"),
    (dict(alpha_r=0.0, beta_r=0.9), "must both lie in (0, 1]"),
    (dict(alpha_r=0.9, beta_r=1.2), "must both lie in (0, 1]"),
])
def test_bad_values_are_refused_before_compiling(tmp_path, monkeypatch, change, fragment):
  monkeypatch.setattr(jax, "jit", lambda *a, **k: (_ for _ in ()).throw(AssertionError("jit")))
  c = _config(**change)
  c.teacher.workdir = str(tmp_path / "teacher")
  with pytest.raises(ConfigError, match="config.fgm.real_data") as err:
    main_lib.run(c, str(tmp_path / "run"))
  assert fragment in str(err.value)


def test_real_data_needs_the_half_form_generator_loss(tmp_path):
  c = _config()
  c.fgm.alpha = 1.0
  with pytest.raises(ConfigError, match="config.fgm.alpha=1.0.*--config.fgm.alpha=0.5"):
    main_lib.run(c, str(tmp_path))


def test_real_data_refused_for_a_teacher_without_data(tmp_path):
  """SD3 FGM's teacher is a diffusers folder: there is no real data to read."""
  from configs import sd3_fgm
  from fgm_jax import config_checks
  c = sd3_fgm.get_config("runlocal")
  c.fgm.real_data.enabled = True
  with pytest.raises(ConfigError, match="config.fgm.real_data.enabled=True: an SD3 FGM run "
                     "is data-free"):
    config_checks.validate(c)
