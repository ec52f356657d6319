"""Flow Generator Matching losses as pure functions (DESIGN.md §2).

Three velocity fields of one architecture: the frozen teacher v_T, the online flow v_psi that
tracks the generator's own flow field, and the generator's net v_theta, used as

    g_theta(z) = x_in - t* v_theta(x_in, t*),   x_in = t* z.

The generator loss for a batch of generator samples x0 = g_theta(z):

    x_t = (1 - t) x0 + t eps,  a = v_T(x_t) - v_psi(x_t),  b = v_psi(x_t) - (eps - x0)
    L_G = E_t[ w(t) (<a, b> + (1 - alpha) ||a||²) ]

Gradients reach theta through x_t (inside both fields) and through x0 in b; the callers make
sure only the generator's parameters are differentiated. Inner products are means over the
feature dimensions (so the loss scale does not grow with image size).
"""

import jax
import jax.numpy as jnp

from fgm_jax import flow

WEIGHTINGS = ("sid_norm", "uniform")
# alpha = 1: the term the FGM paper trains with; 0.5: half its exact "L1 + L2" identity;
# 1.2: SiD's choice. Any float is accepted; these are the documented ones.
DOCUMENTED_ALPHAS = (0.5, 1.0, 1.2)
TEACHER_DTYPES = ("float32", "bfloat16")


def check_config(fgm_config):
  """What is wrong with config.fgm, as one message naming the field and the fix, or None.

  Beside the losses so that an option is checked where it is defined; a plain function of
  the values (no config-checking import), as the data modules' check_config.
  """
  c = fgm_config
  checks = [
      (c.weighting in WEIGHTINGS,
       f"config.fgm.weighting={c.weighting!r} is unknown; choose one of {WEIGHTINGS}."),
      (0 < c.t_star <= 1, f"config.fgm.t_star={c.t_star} must lie in (0, 1]."),
      (0 <= c.t_min < c.t_max <= 1,
       f"config.fgm.t_min={c.t_min}, t_max={c.t_max}: need 0 <= t_min < t_max <= 1."),
      (c.online_steps >= 1, f"config.fgm.online_steps={c.online_steps} must be >= 1."),
      *[(c[f] in ("teacher", "random"),
         f"config.fgm.{f}={c[f]!r}: choose 'teacher' (the default) or 'random'.")
        for f in ("init_generator", "init_online")],
      (c.guidance >= 1.0, f"config.fgm.guidance={c.guidance} must be >= 1 (1: no guidance)."),
      (c.teacher_dtype in TEACHER_DTYPES,
       f"config.fgm.teacher_dtype={c.teacher_dtype!r}: choose 'float32' or 'bfloat16'."),
  ]
  return next((message for ok, message in checks if not ok), None)


def _per_example_mean(x):
  return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def generator_sample(velocity_fn, z, t_star: float):
  """One-step generator g(z) = t* z - t* v(t* z, t*), i.e. x0_hat of the point t* z at t*."""
  x_in = t_star * z
  t = jnp.full((z.shape[0],), t_star, dtype=z.dtype)
  return flow.clean_estimate(x_in, t, velocity_fn(x_in, t))


def online_flow_loss(online_velocity_fn, x0, eps, t):
  """Flow-matching loss of the online flow on (stop-gradient) generator samples."""
  x0 = jax.lax.stop_gradient(x0)
  x_t = flow.interpolate(x0, eps, t)
  return jnp.mean(flow.flow_matching_loss(online_velocity_fn(x_t, t), x0, eps))


def loss_weight(weighting: str, t, x0, x_t, v_teacher):
  """w(t) per example.

  'sid_norm': t² / stop_grad(mean |x0 - x0_hat_T(x_t)|) -- the x0-space form of the loss
  (x0_hat differences are t times velocity differences) normalised per sample as SiD does.
  'uniform': 1.
  """
  if weighting == "uniform":
    return jnp.ones_like(t)
  if weighting == "sid_norm":
    x0_hat = flow.clean_estimate(x_t, t, v_teacher)
    scale = _per_example_mean(jnp.abs(x0 - x0_hat))
    return jnp.square(t) / jax.lax.stop_gradient(scale + 1e-6)
  raise ValueError(f"unknown FGM weighting {weighting!r}; choose one of {WEIGHTINGS}.")


def generator_loss_per_example(teacher_velocity_fn, online_velocity_fn, x0, eps, t,
                               alpha: float = 1.0, weighting: str = "sid_norm"):
  """Per-example FGM generator loss w(t) (<a, b> + (1 - alpha) ||a||²); see module doc."""
  x_t = flow.interpolate(x0, eps, t)
  v_teacher = teacher_velocity_fn(x_t, t)
  v_online = online_velocity_fn(x_t, t)
  a = v_teacher - v_online
  b = v_online - flow.conditional_velocity(x0, eps)
  per_example = _per_example_mean(a * b) + (1.0 - alpha) * _per_example_mean(a * a)
  weight = loss_weight(weighting, t, jax.lax.stop_gradient(x0), x_t, v_teacher)
  return weight * per_example


def generator_loss(teacher_velocity_fn, online_velocity_fn, x0, eps, t, alpha=1.0,
                   weighting="sid_norm"):
  return jnp.mean(generator_loss_per_example(
      teacher_velocity_fn, online_velocity_fn, x0, eps, t, alpha, weighting))
