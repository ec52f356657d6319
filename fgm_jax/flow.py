"""Rectified-flow path, time samplers, ODE samplers and classifier-free guidance.

Convention everywhere (DESIGN.md §2): t = 0 is data, t = 1 is noise,
    x_t = (1 - t) x0 + t eps,     u(x_t | x0) = eps - x0,     x0_hat = x_t - t v(x_t, t).
Every function takes a velocity function ``velocity_fn(x, t) -> v`` with ``t`` of shape (B,);
nothing here knows which network is behind it.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]


def _bcast(t, x):
  """Reshapes per-example times (B,) so they broadcast against x (B, ...)."""
  return jnp.reshape(t, t.shape + (1,) * (x.ndim - t.ndim))


def interpolate(x0, eps, t):
  """The path x_t = (1 - t) x0 + t eps."""
  t = _bcast(t, x0)
  return (1.0 - t) * x0 + t * eps


def conditional_velocity(x0, eps):
  """u(x_t | x0) = d x_t / dt, independent of t on a straight path."""
  return eps - x0


def clean_estimate(x_t, t, v):
  """x0_hat = x_t - t v: where the straight line through x_t with velocity v meets t = 0."""
  return x_t - _bcast(t, x_t) * v


def flow_matching_loss(v_pred, x0, eps):
  """Per-example conditional flow-matching loss ||v - (eps - x0)||², averaged over dims."""
  err = v_pred - conditional_velocity(x0, eps)
  return jnp.mean(jnp.square(err).reshape(err.shape[0], -1), axis=1)


# --- time samplers ---------------------------------------------------------------------------


def shift_time(t, shift: float):
  """SD3's resolution shift t' = s t / (1 + (s - 1) t); s = 1 is the identity."""
  return shift * t / (1.0 + (shift - 1.0) * t)


def sample_time(rng, batch: int, sampler: str = "uniform", *, t_min: float = 0.0,
                t_max: float = 1.0, logit_mean: float = 0.0, logit_std: float = 1.0,
                shift: float = 1.0):
  """Draws per-example times in [t_min, t_max].

  sampler: 'uniform'; 'logit_normal' (sigmoid of a normal, SD3's default training density).
  ``shift`` then applies SD3's time shift; the result is clipped to [t_min, t_max].
  """
  if sampler == "uniform":
    t = jax.random.uniform(rng, (batch,), minval=t_min, maxval=t_max)
  elif sampler == "logit_normal":
    t = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, (batch,)))
    t = t_min + (t_max - t_min) * t
  else:
    raise ValueError(f"unknown time sampler {sampler!r}; use 'uniform' or 'logit_normal'.")
  if shift != 1.0:
    t = shift_time(t, shift)
  return jnp.clip(t, t_min, t_max)


# --- ODE samplers (t = 1 -> t = 0) -------------------------------------------------------------


def time_grid(steps: int, shift: float = 1.0, t_end: float = 0.0):
  """steps + 1 decreasing times from 1 to t_end, optionally SD3-shifted."""
  if steps < 1:
    raise ValueError(f"sampler steps must be >= 1, got {steps}.")
  ts = jnp.linspace(1.0, t_end, steps + 1)
  return shift_time(ts, shift) if shift != 1.0 else ts


def _times(ts_scalar, x):
  return jnp.full((x.shape[0],), ts_scalar, dtype=x.dtype)


def euler_on_grid(velocity_fn: VelocityFn, noise, ts):
  """Euler integration of dx/dt = v along the decreasing times ``ts`` (len = steps + 1)."""
  ts = jnp.asarray(ts)

  def body(x, i):
    t, t_next = ts[i], ts[i + 1]
    return x + (t_next - t) * velocity_fn(x, _times(t, x)), None

  x, _ = jax.lax.scan(body, noise, jnp.arange(ts.shape[0] - 1))
  return x


def euler_sample(velocity_fn: VelocityFn, noise, steps: int, shift: float = 1.0):
  """Euler integration of dx/dt = v from t = 1 (noise) to t = 0 (data)."""
  return euler_on_grid(velocity_fn, noise, time_grid(steps, shift))


def diffusers_flow_match_grid(steps: int, shift: float = 1.0, num_train_timesteps: int = 1000):
  """The times of diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps(steps), float32.

  Not our ``time_grid``: diffusers spaces the steps linearly between its largest and smallest
  *shifted* training sigma (1 and shift(1/num_train_timesteps)), shifts that grid once more,
  and appends 0. SD3's samplers use this, so matching it is what makes our teacher's
  N-step samples equal diffusers'.
  """
  train = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1]
  train = train / np.float32(num_train_timesteps)
  train = np.float32(shift) * train / (1 + (np.float32(shift) - 1) * train)
  sigma_max, sigma_min = float(train[0]), float(train[-1])
  sigmas = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps,
                       steps) / num_train_timesteps
  sigmas = (shift * sigmas / (1 + (shift - 1) * sigmas)).astype(np.float32)
  return np.concatenate([sigmas, np.zeros(1, np.float32)])


def heun_sample(velocity_fn: VelocityFn, noise, steps: int, shift: float = 1.0):
  """Heun's second-order method (trapezoidal corrector); 2 evaluations per step.

  The last step lands on t = 0, where the corrector is still well defined for a velocity net.
  """
  ts = time_grid(steps, shift)

  def body(x, i):
    t, t_next = ts[i], ts[i + 1]
    dt = t_next - t
    v = velocity_fn(x, _times(t, x))
    x_pred = x + dt * v
    v_next = velocity_fn(x_pred, _times(t_next, x))
    return x + dt * 0.5 * (v + v_next), None

  x, _ = jax.lax.scan(body, noise, jnp.arange(steps))
  return x


SAMPLERS = {"euler": euler_sample, "heun": heun_sample}


def sample(velocity_fn: VelocityFn, noise, steps: int, method: str = "euler",
           shift: float = 1.0):
  if method not in SAMPLERS:
    raise ValueError(f"unknown sampler {method!r}; choose one of {sorted(SAMPLERS)}.")
  return SAMPLERS[method](velocity_fn, noise, steps, shift)


# --- guidance and SD3 timestep convention -----------------------------------------------------


def cfg_velocity(v_uncond, v_cond, scale: float):
  """Classifier-free guidance: v_u + w (v_c - v_u); w = 1 returns the conditional field."""
  return v_uncond + scale * (v_cond - v_uncond)


def _pair(a, b):
  """(B, ...) and (B, ...) -> (2B, ...) with rows a0, b0, a1, b1, ...: each example's two
  copies sit next to each other, so a batch split over devices stays on its devices."""
  return jnp.stack([a, b], axis=1).reshape((2 * a.shape[0],) + a.shape[1:])


def _unpair(ab):
  ab = ab.reshape((ab.shape[0] // 2, 2) + ab.shape[1:])
  return ab[:, 0], ab[:, 1]


def guided(velocity_fn_cond: Callable, cond, null_cond, scale: float) -> VelocityFn:
  """Wraps ``velocity_fn_cond(x, t, cond)`` into a CFG velocity function of (x, t).

  ``cond`` and ``null_cond`` have the batch's leading axis. The unconditional and conditional
  fields are one network pass over the doubled batch (as diffusers' pipelines do): one
  program for the compiler instead of two, and larger matmuls.
  """

  def fn(x, t):
    if scale == 1.0:
      return velocity_fn_cond(x, t, cond)
    both = velocity_fn_cond(_pair(x, x), _pair(t, t), jax.tree.map(_pair, null_cond, cond))
    return cfg_velocity(*_unpair(both), scale)

  return fn


def sd3_timestep(t):
  """SD3's MM-DiT takes timesteps in [0, 1000]; t in [0, 1] maps linearly."""
  return 1000.0 * t
