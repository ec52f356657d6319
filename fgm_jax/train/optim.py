"""Optimizers and parameter EMA from an ``optim`` ConfigDict.

Fields: lr, b1, b2, eps, warmup_steps, decay_steps and final_lr_scale (a cosine fall of the
learning rate, see learning_rate_schedule), grad_clip (<= 0 disables), weight_decay, ema_decay
(0 disables the EMA: the EMA copy then equals the parameters), extra_ema_decays (an FGM
generator's further EMAs, each named ema_name(decay)); configs/common.optim sets all of them.
"""

import jax
import optax


def check_config(optim_config, field: str, extra_emas: bool = False):
  """What is wrong with the optim section at ``field`` (e.g. 'config.optim'), or None.
  ``extra_emas``: whether this section's network keeps extra EMAs (an FGM generator)."""
  o = optim_config
  extra = tuple(o.extra_ema_decays)
  checks = [
      (o.lr > 0, f"{field}.lr={o.lr} must be > 0; e.g. --{field}.lr=1e-4."),
      (0 <= o.b1 < 1 and 0 <= o.b2 < 1,
       f"{field}.b1={o.b1}, {field}.b2={o.b2} must lie in [0, 1)."),
      (0 <= o.ema_decay < 1,
       f"{field}.ema_decay={o.ema_decay} must lie in [0, 1); 0 disables the EMA."),
      (o.warmup_steps >= 0, f"{field}.warmup_steps={o.warmup_steps} must be >= 0."),
      (_decay_ok(o),
       f"{field}.decay_steps={_decay_steps(o)}: give () for a constant learning rate "
       f"or (start, end) with warmup_steps={o.warmup_steps} <= start < end, e.g. "
       f"--{field}.decay_steps=\"(600, 1800)\"."),
      (0 <= o.final_lr_scale <= 1,
       f"{field}.final_lr_scale={o.final_lr_scale} must lie in [0, 1] (the learning rate at "
       "the end of decay_steps, as a share of lr)."),
      (extra_emas or not extra,
       f"{field}.extra_ema_decays={extra}: only an FGM generator keeps extra EMAs (its "
       "config.optim); set it to ()."),
      (all(0 < d < 1 for d in extra),
       f"{field}.extra_ema_decays={extra}: each decay must lie in (0, 1)."),
      (len(set(extra + (o.ema_decay,))) == len(extra) + 1,
       f"{field}.extra_ema_decays={extra}: repeats a decay or ema_decay={o.ema_decay} "
       "(the 'ema' weights); list each other decay once."),
  ]
  return next((message for ok, message in checks if not ok), None)


def ema_name(decay: float) -> str:
  """The weights name of an extra EMA, e.g. 'ema_0.9999': the decay it is updated with."""
  return f"ema_{float(decay)!r}"


def ema_decay_of(name: str) -> float:
  """The decay an extra EMA named ``name`` (ema_name) is updated with."""
  return float(name[len("ema_"):])


def extra_ema_names(optim_config) -> tuple:
  """The names of the extra EMAs of extra_ema_decays, in their order."""
  return tuple(ema_name(d) for d in optim_config.extra_ema_decays)


def weight_names(optim_config) -> tuple:
  """The generator weights a run with this optim section keeps, by name: 'ema' (the EMA at
  ema_decay, or the trained weights when it keeps none), 'raw', and one per extra EMA."""
  return ("ema", "raw") + extra_ema_names(optim_config)


def check_weights(optim_config, weights, field: str):
  """What is wrong with the weights named at ``field`` (e.g. 'config.sample.weights') for a
  run with this optim section, or None."""
  names = weight_names(optim_config)
  if weights in names:
    return None
  return f"{field}={weights!r} is not kept by this run; choose one of {list(names)}."


def _decay_steps(o):
  return tuple(o.decay_steps)


def _decay_ok(o) -> bool:
  steps = _decay_steps(o)
  return not steps or (len(steps) == 2 and o.warmup_steps <= steps[0] < steps[1])


def learning_rate_schedule(optim_config):
  """Linear warm-up from 0 over warmup_steps, then lr; with decay_steps = (start, end), a
  cosine fall from lr at start to final_lr_scale * lr at end, held after. The constant part
  before start is the same as without decay, so a constant-lr run's checkpoint at step
  <= start is a valid start for the decayed run (experiments/mnist5k_realuid_study.sh)."""
  lr = optim_config.lr
  warmup = optim_config.warmup_steps
  parts, boundaries = [], []
  if warmup > 0:
    parts.append(optax.linear_schedule(0.0, lr, warmup))
    boundaries.append(warmup)
  steps = _decay_steps(optim_config)
  if not steps:
    parts.append(optax.constant_schedule(lr))
  else:
    start, end = steps
    if start > warmup:
      parts.append(optax.constant_schedule(lr))
      boundaries.append(start)
    parts.append(optax.cosine_decay_schedule(lr, end - start, alpha=optim_config.final_lr_scale))
  if len(parts) == 1:
    return parts[0]
  return optax.join_schedules(parts, boundaries)


def make_optimizer(optim_config, frozen=()) -> optax.GradientTransformation:
  """AdamW (with clipping and warm-up) from the config; top-level parameter groups named in
  ``frozen`` (e.g. MM-DiT's fixed positional table) get zero updates and no optimizer state."""
  tx = _adamw(optim_config)
  if not frozen:
    return tx

  def labels(params):
    # One label per top-level group (a prefix of the params tree), so logically boxed and
    # plain trees get the same optimizer-state structure.
    return {k: "frozen" if k in frozen else "trained" for k in params}
  return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)


def _adamw(optim_config):
  parts = []
  if optim_config.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim_config.grad_clip))
  parts.append(optax.adamw(learning_rate_schedule(optim_config), b1=optim_config.b1,
                           b2=optim_config.b2, eps=optim_config.eps,
                           weight_decay=optim_config.weight_decay))
  return optax.chain(*parts)


def ema_update(ema_params, params, decay: float):
  """ema <- decay * ema + (1 - decay) * params."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)
