"""One training step per trainer, as pure functions of (state, inputs, rng).

Randomness is keyed by ``fold_in(base_rng, state.step)``, so a step computes the same thing
whenever it runs (fresh or resumed) and on any mesh (threefry is partitionable).
"""

import functools

import jax
import jax.numpy as jnp
import optax

from fgm_jax import fgm
from fgm_jax import flow
from fgm_jax import sharding as sharding_lib
from fgm_jax.train import optim
from fgm_jax.train.state import FGMState, TeacherState


def velocity_fn(model, params, *, train=False, dropout_rng=None, cond=None):
  """Closes a Linen velocity net over its parameters: (x, t) -> v."""
  rngs = {"dropout": dropout_rng} if dropout_rng is not None else None

  def fn(x, t):
    return model.apply({"params": params}, x, t, cond, train=train, rngs=rngs)

  return fn


def draw_times(rng, batch, section):
  """Times for a flow-matching loss, from a config with time_sampler/t_min/t_max/... fields."""
  return flow.sample_time(rng, batch, section.time_sampler, t_min=section.t_min,
                          t_max=section.t_max, logit_mean=section.logit_mean,
                          logit_std=section.logit_std, shift=section.shift)


def state_finite(state):
  """True when every floating-point number of ``state`` is finite, read by the loop only on
  save and log steps (so a NaN is never checkpointed). One reduction per leaf: for a U-Net FGM
  state (2,912 leaves) that is 49 MB of TPU code and 23 s of compiling on its own; one
  reduction over the concatenated leaves was larger still (97 MB, 5 GB of temporaries;
  experiments/results/tpu_aot_unet.md)."""
  leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _apply_updates(tx, grads, opt_state, params):
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def teacher_step(state: TeacherState, batch, base_rng, *, model, tx, flow_config, ema_decay,
                 mesh):
  """Conditional flow matching on a data batch."""
  rng = jax.random.fold_in(base_rng, state.step)
  rng_t, rng_eps, rng_drop = jax.random.split(rng, 3)
  n = batch.shape[0]
  t = sharding_lib.constrain_batch(draw_times(rng_t, n, flow_config), mesh)
  eps = sharding_lib.constrain_batch(jax.random.normal(rng_eps, batch.shape, batch.dtype), mesh)

  def loss_fn(params):
    v = velocity_fn(model, params, train=True, dropout_rng=rng_drop)
    x_t = flow.interpolate(batch, eps, t)
    return jnp.mean(flow.flow_matching_loss(v(x_t, t), batch, eps))

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  params, opt_state = _apply_updates(tx, grads, state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            ema_params=optim.ema_update(state.ema_params, params, ema_decay))
  return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads),
                     "state_finite": state_finite(new_state)}


def _generator_draws(rng, batch, shape, fgm_config, mesh):
  rng_z, rng_eps, rng_t = jax.random.split(rng, 3)
  z = sharding_lib.constrain_batch(jax.random.normal(rng_z, (batch,) + tuple(shape)), mesh)
  eps = sharding_lib.constrain_batch(jax.random.normal(rng_eps, (batch,) + tuple(shape)), mesh)
  t = sharding_lib.constrain_batch(draw_times(rng_t, batch, fgm_config), mesh)
  return z, eps, t


def guided_teacher(model, teacher_params, cond, null_cond, guidance: float, mesh):
  """The teacher's velocity (x, t) -> v, with classifier-free guidance when ``null_cond`` is
  given: v(x, t, null) + w (v(x, t, c) - v(x, t, null)). ``null_cond`` has leading axis 1
  (the one unconditional embedding) and is broadcast over the batch here."""
  if null_cond is None or guidance == 1.0:
    return velocity_fn(model, teacher_params, cond=cond)
  batch = jax.tree.leaves(cond)[0].shape[0]
  null = jax.tree.map(lambda u: sharding_lib.constrain_batch(
      jnp.broadcast_to(u, (batch,) + u.shape[1:]), mesh), null_cond)

  def conditional(x, t, c):
    return model.apply({"params": teacher_params}, x, t, c)

  return flow.guided(conditional, cond, null, guidance)


def _ema(ema_params, params, decay):
  return None if ema_params is None else optim.ema_update(ema_params, params, decay)


def _extra_emas(emas, params):
  """Each further EMA with the decay its name carries (optim.ema_name): {} stays {}."""
  return {name: optim.ema_update(ema, params, optim.ema_decay_of(name))
          for name, ema in emas.items()}


def _trainable_only(trainable, teacher_params):
  del teacher_params
  return trainable


def fgm_step(state: FGMState, teacher_params, cond, base_rng, null_cond=None, real=None, *,
             model, gen_tx, online_tx, fgm_config, batch_size, shape, ema_decay, mesh,
             compose=_trainable_only):
  """One FGM iteration: ``fgm_config.online_steps`` online-flow updates, then one generator
  update.

  ``cond``: None (unconditional, data-free), or a pytree of per-example conditioning with
  leading axis ``batch_size`` that all three networks see (e.g. prompt embeddings).
  ``null_cond``: the unconditional embedding (leading axis 1); with it the teacher is guided
  with scale ``fgm_config.guidance`` (text-to-image). Generator and online flow see ``cond``.
  ``compose(trainable, teacher_params)``: the parameters the model applies for a trained
  network (generator, online flow) -- the trainable tree itself, or e.g. low-rank adapters
  over the frozen teacher's weights.
  ``real``: with config.fgm.real_data on (RealUID), ``online_steps * batch_size`` real
  examples, one batch per online update, sharing that update's t and eps index by index.
  """
  rng = jax.random.fold_in(base_rng, state.step)
  t_star = fgm_config.t_star
  online_params, online_opt_state = state.online_params, state.online_opt_state
  apply = functools.partial(velocity_fn, model, cond=cond)
  net = lambda trainable: apply(compose(trainable, teacher_params))
  generator = net(state.gen_params)

  real_data = fgm_config.real_data
  online_losses = []
  for k in range(fgm_config.online_steps):
    z, eps, t = _generator_draws(jax.random.fold_in(rng, k), batch_size, shape, fgm_config, mesh)
    x0 = fgm.generator_sample(generator, z, t_star)

    def online_loss_fn(params):
      if not real_data.enabled:
        return fgm.online_flow_loss(net(params), x0, eps, t)
      x0_real = sharding_lib.constrain_batch(real[k * batch_size:(k + 1) * batch_size], mesh)
      return fgm.real_data_online_loss(net(params), x0, x0_real, eps, t, real_data.alpha,
                                       real_data.beta)

    loss, grads = jax.value_and_grad(online_loss_fn)(online_params)
    online_params, online_opt_state = _apply_updates(online_tx, grads, online_opt_state,
                                                     online_params)
    online_losses.append(loss)

  z, eps, t = _generator_draws(jax.random.fold_in(rng, fgm_config.online_steps), batch_size,
                               shape, fgm_config, mesh)
  teacher_v = guided_teacher(model, teacher_params, cond, null_cond,
                             fgm_config.guidance if null_cond is not None else 1.0, mesh)
  online_v = net(jax.lax.stop_gradient(online_params))

  def gen_loss_fn(params):
    x0 = fgm.generator_sample(net(params), z, t_star)
    if real_data.enabled:
      return fgm.real_data_generator_loss(teacher_v, online_v, x0, eps, t, real_data.alpha,
                                          real_data.beta, fgm_config.alpha,
                                          fgm_config.weighting)
    return fgm.generator_loss(teacher_v, online_v, x0, eps, t, fgm_config.alpha,
                              fgm_config.weighting)

  gen_loss, gen_grads = jax.value_and_grad(gen_loss_fn)(state.gen_params)
  gen_params, gen_opt_state = _apply_updates(gen_tx, gen_grads, state.gen_opt_state,
                                             state.gen_params)
  new_state = state.replace(
      step=state.step + 1, gen_params=gen_params, gen_opt_state=gen_opt_state,
      gen_ema_params=_ema(state.gen_ema_params, gen_params, ema_decay),
      gen_extra_emas=_extra_emas(state.gen_extra_emas, gen_params),
      online_params=online_params, online_opt_state=online_opt_state)
  metrics = {"online_loss": jnp.mean(jnp.stack(online_losses)), "generator_loss": gen_loss,
             "generator_grad_norm": optax.tree.norm(gen_grads),
             "state_finite": state_finite(new_state)}
  return new_state, metrics


def generate(model, gen_params, z, t_star):
  """One-step generator samples g(z)."""
  return fgm.generator_sample(velocity_fn(model, gen_params), z, t_star)


def teacher_sample(model, params, noise, steps, method="euler", shift=1.0):
  return flow.sample(velocity_fn(model, params), noise, steps, method, shift)
