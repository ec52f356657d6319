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

Real-data supervision (RealUID, Kornilov et al. 2026; config.fgm.real_data; the math in our
conventions: DESIGN.md §2): with weights a_r, b_r in (0, 1] (the paper's alpha, beta) and a
real example x0* sharing t and eps with the generated one at its index,

    L_psi = a_r ||v_psi(x_t) - (b_r/a_r)(eps - x0)||² + (1 - a_r) ||v_psi(x_t*) - k (eps - x0*)||²
            k = (1 - b_r)/(1 - a_r)   (the second term only when a_r < 1)
    L_G   = 2 a_r w(t) [<a, b_beta> + (1 - alpha) ||a||²],  b_beta = v_psi - (b_r/a_r)(eps - x0)

RealUID's generator loss is the alpha = 1/2 form (checked at config time); the real term of
L_G has no theta and drops out. a_r = b_r = 1 is FGM with alpha = 1/2 (L_G doubled).
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
      (c.init_generator in ("teacher", "random", "run"),
       f"config.fgm.init_generator={c.init_generator!r}: choose 'teacher' (the default), "
       "'random' or 'run' (config.fgm.init_run's generator: a fine-tuning stage)."),
      (c.init_online in ("teacher", "random"),
       f"config.fgm.init_online={c.init_online!r}: choose 'teacher' (the default) or "
       "'random'."),
      (c.init_generator != "run" or bool(c.init_run),
       "config.fgm.init_run is empty; set it to the --workdir of the finished FGM run whose "
       "generator this run fine-tunes (config.fgm.init_generator='run')."),
      (c.guidance >= 1.0, f"config.fgm.guidance={c.guidance} must be >= 1 (1: no guidance)."),
      (c.teacher_dtype in TEACHER_DTYPES,
       f"config.fgm.teacher_dtype={c.teacher_dtype!r}: choose 'float32' or 'bfloat16'."),
  ]
  return next((message for ok, message in checks if not ok), None) or check_real_data(c)


def check_real_data(fgm_config):
  """What is wrong with config.fgm.real_data (RealUID), as one message, or None."""
  r = fgm_config.real_data
  if not r.enabled:
    return None
  beta_max = float("inf") if r.allow_beta_above_one else 1.0
  checks = [
      (0 < r.alpha <= 1 and 0 < r.beta <= beta_max,
       f"config.fgm.real_data: alpha={r.alpha}, beta={r.beta} must both lie in (0, 1] "
       "(RealUID's headline: alpha 0.92, beta 0.94; beta > 1 only with "
       "allow_beta_above_one=True, outside the paper's range)."),
      (r.alpha < 1 or r.beta <= 1, f"config.fgm.real_data: alpha=1 with beta={r.beta} > 1 "
       "divides by 1 - alpha = 0 in the real target; lower alpha."),
      (r.alpha < 1 or r.beta == 1,
       f"config.fgm.real_data: alpha=1 with beta={r.beta} < 1 gives the real data no weight "
       "while scaling the generated target (RealUID reports it diverges); lower alpha "
       "(e.g. 0.92) or set beta=1."),
      (fgm_config.alpha == 0.5,
       f"config.fgm.alpha={fgm_config.alpha}: RealUID's generator loss is the alpha = 0.5 form "
       "(its theory covers only that one); set --config.fgm.alpha=0.5."),
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


def real_data_online_loss(online_velocity_fn, x0, x0_real, eps, t, alpha_r: float,
                          beta_r: float):
  """RealUID's online-flow loss (module doc): generated samples (stop-gradient) with the
  target scaled by beta_r/alpha_r, real ones with (1 - beta_r)/(1 - alpha_r), the same t and
  eps at each index. alpha_r = beta_r = 1 is plain flow matching on generated samples."""
  x0 = jax.lax.stop_gradient(x0)
  target = (beta_r / alpha_r) * flow.conditional_velocity(x0, eps)
  x_t = flow.interpolate(x0, eps, t)
  loss = alpha_r * _per_example_mean(jnp.square(online_velocity_fn(x_t, t) - target))
  if alpha_r < 1.0:  # (alpha_r = 1 goes with beta_r = 1: the real term has no weight)
    real_target = ((1.0 - beta_r) / (1.0 - alpha_r)) * flow.conditional_velocity(x0_real, eps)
    x_t_real = flow.interpolate(x0_real, eps, t)
    loss = loss + (1.0 - alpha_r) * _per_example_mean(
        jnp.square(online_velocity_fn(x_t_real, t) - real_target))
  return jnp.mean(loss)


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
                               alpha: float = 1.0, weighting: str = "sid_norm",
                               target_scale: float = 1.0):
  """Per-example FGM generator loss w(t) (<a, b> + (1 - alpha) ||a||²); see module doc.
  ``target_scale`` multiplies the conditional velocity in b (RealUID's beta/alpha)."""
  x_t = flow.interpolate(x0, eps, t)
  v_teacher = teacher_velocity_fn(x_t, t)
  v_online = online_velocity_fn(x_t, t)
  a = v_teacher - v_online
  b = v_online - target_scale * flow.conditional_velocity(x0, eps)
  per_example = _per_example_mean(a * b) + (1.0 - alpha) * _per_example_mean(a * a)
  weight = loss_weight(weighting, t, jax.lax.stop_gradient(x0), x_t, v_teacher)
  return weight * per_example


def generator_loss(teacher_velocity_fn, online_velocity_fn, x0, eps, t, alpha=1.0,
                   weighting="sid_norm"):
  return jnp.mean(generator_loss_per_example(
      teacher_velocity_fn, online_velocity_fn, x0, eps, t, alpha, weighting))


def real_data_generator_loss(teacher_velocity_fn, online_velocity_fn, x0, eps, t,
                             alpha_r: float, beta_r: float, alpha: float = 0.5,
                             weighting: str = "sid_norm"):
  """RealUID's generator loss 2 alpha_r w(t) [<a, b_beta> + (1 - alpha) ||a||²] (module doc);
  with alpha_r = beta_r = 1 exactly twice ``generator_loss``."""
  return 2.0 * alpha_r * jnp.mean(generator_loss_per_example(
      teacher_velocity_fn, online_velocity_fn, x0, eps, t, alpha, weighting,
      target_scale=beta_r / alpha_r))
