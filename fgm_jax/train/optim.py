"""Optimizers and parameter EMA from an ``optim`` ConfigDict.

Fields: lr, b1, b2, eps, warmup_steps, grad_clip (<= 0 disables), weight_decay, ema_decay
(0 disables the EMA: the EMA copy then equals the parameters); configs/common.optim sets
all of them.
"""

import jax
import optax


def check_config(optim_config, field: str):
  """What is wrong with the optim section at ``field`` (e.g. 'config.optim'), or None."""
  o = optim_config
  checks = [
      (o.lr > 0, f"{field}.lr={o.lr} must be > 0; e.g. --{field}.lr=1e-4."),
      (0 <= o.b1 < 1 and 0 <= o.b2 < 1,
       f"{field}.b1={o.b1}, {field}.b2={o.b2} must lie in [0, 1)."),
      (0 <= o.ema_decay < 1,
       f"{field}.ema_decay={o.ema_decay} must lie in [0, 1); 0 disables the EMA."),
      (o.warmup_steps >= 0, f"{field}.warmup_steps={o.warmup_steps} must be >= 0."),
  ]
  return next((message for ok, message in checks if not ok), None)


def learning_rate_schedule(optim_config):
  lr = optim_config.lr
  warmup = optim_config.warmup_steps
  if warmup <= 0:
    return optax.constant_schedule(lr)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])


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
