"""FGM's generator gradient against a closed form (DESIGN.md §2).

Data N(mu, sigma²), linear generator g(z) = m + s z, so p_theta = N(m, s²). For a Gaussian
start, the rectified-flow field is linear in x:

    v(x, t) = E[eps - x0 | x_t = x] = -mean + c_t (x - (1 - t) mean),
    c_t = (t - (1 - t) var) / ((1 - t)² var + t²)

For fixed t every integrand is a polynomial in (z, eps) of degree <= 4, so Gauss-Hermite
quadrature over (z, eps) is exact; both sides share one Gauss-Legendre rule over t.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest


from fgm_jax import fgm

MU, SIGMA = 1.3, 0.6  # data
M, S = 0.2, 1.4  # generator, far from the data so the gradient is not small


def gaussian_field(mean, std):
  var = jnp.square(std)

  def v(x, t):
    c = (t - (1 - t) * var) / ((1 - t) ** 2 * var + t ** 2)
    return -mean + c * (x - (1 - t) * mean)

  return v


def quadrature(n_normal=8, n_time=24, t_lo=0.02, t_hi=0.98):
  """Flattened nodes/weights over (t, z, eps): E_t E_z,eps f = sum w f."""
  zn, zw = np.polynomial.hermite_e.hermegauss(n_normal)
  zw = zw / zw.sum()  # probabilists' Hermite: weights of N(0, 1)
  tn, tw = np.polynomial.legendre.leggauss(n_time)
  tn = t_lo + (t_hi - t_lo) * (tn + 1) / 2
  tw = tw / tw.sum()
  t, z, e = np.meshgrid(tn, zn, zn, indexing="ij")
  w = tw[:, None, None] * zw[None, :, None] * zw[None, None, :]
  return [jnp.asarray(a.reshape(-1)) for a in (t, z, e, w)]


def fgm_objective(theta, alpha, nodes):
  """E[w(t) (<a,b> + (1-alpha)|a|²)] with v_psi = exact field of p_theta, frozen params."""
  t, z, eps, w = nodes
  m, s = theta
  v_teacher = gaussian_field(MU, SIGMA)
  m_sg, s_sg = jax.lax.stop_gradient(theta)
  v_online = gaussian_field(m_sg, s_sg)  # tracks the generator, gradients only via inputs
  x0 = (m + s * z)[:, None]
  per_example = fgm.generator_loss_per_example(
      lambda x, tt: v_teacher(x, tt[:, None]), lambda x, tt: v_online(x, tt[:, None]),
      x0, eps[:, None], t, alpha=alpha, weighting="uniform")
  return jnp.sum(w * per_example)


def direct_objective(theta, nodes):
  """J(theta) = E_t E_{x ~ p_theta,t} |v_T(x) - v_theta(x)|², differentiated in full."""
  t, z, eps, w = nodes
  m, s = theta
  x = (1 - t) * (m + s * z) + t * eps
  diff = gaussian_field(MU, SIGMA)(x, t) - gaussian_field(m, s)(x, t)
  return jnp.sum(w * diff ** 2)


@pytest.fixture(scope="module")
def grads():
  with jax.enable_x64(True):
    nodes = quadrature()
    theta = jnp.array([M, S], jnp.float64)
    g_direct = np.asarray(jax.grad(direct_objective)(theta, nodes))
    g_fgm = {a: np.asarray(jax.grad(fgm_objective)(theta, a, nodes)) for a in (0.5, 1.0, 1.2)}
  return g_direct, g_fgm


def test_quadrature_is_exact_for_gaussian_moments():
  with jax.enable_x64(True):
    _, z, eps, w = quadrature()
    # E z^4 = 3, E z² eps² = 1: polynomial moments integrate exactly.
    np.testing.assert_allclose(float(jnp.sum(w * z ** 4)), 3.0, rtol=1e-12)
    np.testing.assert_allclose(float(jnp.sum(w * z ** 2 * eps ** 2)), 1.0, rtol=1e-12)


def test_field_is_the_true_conditional_expectation():
  """Monte-Carlo check that the closed-form field is E[eps - x0 | x_t] (regression slope)."""
  rng = np.random.default_rng(0)
  x0 = MU + SIGMA * rng.standard_normal(2_000_000)
  eps = rng.standard_normal(2_000_000)
  t = 0.3
  xt = (1 - t) * x0 + t * eps
  slope, intercept = np.polyfit(xt, eps - x0, 1)
  v = gaussian_field(MU, SIGMA)
  np.testing.assert_allclose([float(v(1.0, t) - v(0.0, t)), float(v(0.0, t))],
                             [slope, intercept], atol=1e-2)  # ~6 standard errors


def test_alpha_half_is_half_the_direct_gradient(grads):
  g_direct, g_fgm = grads
  assert np.linalg.norm(g_direct) > 0.1  # a real gradient, not a trivially zero one
  rel = np.linalg.norm(g_fgm[0.5] - 0.5 * g_direct) / np.linalg.norm(0.5 * g_direct)
  assert rel <= 1e-6, (g_fgm[0.5], 0.5 * g_direct)


@pytest.mark.parametrize("alpha", [1.0, 1.2])
def test_other_alphas_point_the_same_way(grads, alpha):
  g_direct, g_fgm = grads
  g = g_fgm[alpha]
  cosine = g @ g_direct / (np.linalg.norm(g) * np.linalg.norm(g_direct))
  assert cosine > 0.999, cosine


def test_alpha_changes_the_gradient(grads):
  """Guards against a loss that ignores alpha."""
  _, g_fgm = grads
  assert np.linalg.norm(g_fgm[1.0] - g_fgm[0.5]) > 1e-3 * np.linalg.norm(g_fgm[0.5])
