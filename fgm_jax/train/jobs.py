"""The two trainable jobs -- teacher (flow matching on data) and distill (FGM) -- as objects
that own their model, sharded state layout and jitted step. The loop in loop.py drives either.
"""

import functools

import jax
import jax.numpy as jnp

from fgm_jax import checkpoint
from fgm_jax import config_checks
from fgm_jax import data as data_lib
from fgm_jax import models
from fgm_jax import parallel
from fgm_jax.data import arrays
from fgm_jax.train import optim
from fgm_jax.train import state as state_lib
from fgm_jax.train import steps


def _rules(config):
  return tuple(tuple(r) for r in config.mesh.get("rules", ()))


def _example_shape(data_config):
  if data_config.name == "toy2d":
    return (2,)
  return tuple(data_config.shape)


class TeacherJob:
  """Flow matching of ``config.model`` on ``config.data``."""

  kind = "teacher"

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    self.model = models.build(config.model)
    self.shape = _example_shape(config.data)
    self.tx = optim.make_optimizer(config.optim)
    self.base_rng = jax.random.PRNGKey(config.seed)
    boxed = jax.eval_shape(self._init_boxed, self.base_rng)
    self.shardings = parallel.tree_shardings(boxed, mesh, _rules(config))
    self.abstract_state = jax.eval_shape(lambda r: parallel.unbox(self._init_boxed(r)),
                                         self.base_rng)
    self._data = None
    self._stream, self._stream_next = None, None
    self._step = jax.jit(
        functools.partial(steps.teacher_step, model=self.model, tx=self.tx,
                          flow_cfg=config.flow, ema_decay=config.optim.get("ema_decay", 0.0),
                          mesh=mesh),
        in_shardings=(self.shardings, parallel.batch_sharding(mesh), parallel.replicated(mesh)),
        out_shardings=(self.shardings, parallel.replicated(mesh)), donate_argnums=0)

  def _init_boxed(self, rng):
    params = state_lib.init_params(self.model, jax.random.fold_in(rng, 0), self.shape)
    return state_lib.teacher_state(params, self.tx)

  @property
  def data(self):
    if self._data is None:  # built lazily: sampling/evaluating a checkpoint needs no data
      self._data = data_lib.build(self.config.data, self.config.seed)
    return self._data

  def init_state(self):
    return jax.jit(lambda r: parallel.unbox(self._init_boxed(r)),
                   out_shardings=self.shardings)(self.base_rng)

  def _local_batch(self, step: int):
    """This process's slice of batch ``step``, prepared ahead on a background thread."""
    if self._stream is None or step != self._stream_next:
      self.close()
      self._stream = arrays.prefetch(self.data, step, self.config.batch_size,
                                     jax.process_index(), jax.process_count(),
                                     depth=self.config.data.get("prefetch", 2))
    got, local = next(self._stream)
    self._stream_next = got + 1
    return local

  def train_step(self, state, step: int):
    batch = parallel.global_batch(self._local_batch(step), self.mesh)
    return self._step(state, batch, jax.random.fold_in(self.base_rng, 1))

  def close(self):
    if self._stream is not None:
      self._stream.close()  # stops and joins the prefetch thread
      self._stream = None

  def sampling_params(self, state, use_ema=True):
    return state.ema_params if use_ema else state.params


class DistillJob:
  """FGM: one-step generator from the frozen teacher named by ``config.teacher``."""

  kind = "distill"

  def __init__(self, config, mesh, teacher_params=None):
    self.config, self.mesh = config, mesh
    self.model = models.build(config.teacher.model)
    self.shape = _example_shape(config.teacher.data)
    self.gen_tx = optim.make_optimizer(config.optim)
    self.online_tx = optim.make_optimizer(config.online_optim)
    self.base_rng = jax.random.PRNGKey(config.seed)
    self.teacher_job = TeacherJob(_teacher_run_config(config), mesh)
    boxed_teacher = jax.eval_shape(self.teacher_job._init_boxed, self.base_rng).params
    boxed = jax.eval_shape(self._state_from_teacher, boxed_teacher)
    rules = _rules(config)
    self.shardings = parallel.tree_shardings(boxed, mesh, rules)
    self.param_shardings = parallel.tree_shardings(boxed_teacher, mesh, rules)
    self.abstract_state = jax.eval_shape(lambda p: parallel.unbox(self._state_from_teacher(p)),
                                         parallel.unbox(boxed_teacher))
    self._teacher_params = teacher_params
    self._step = jax.jit(
        functools.partial(steps.distill_step, model=self.model, gen_tx=self.gen_tx,
                          online_tx=self.online_tx, fgm_cfg=config.fgm,
                          batch_size=config.batch_size, shape=self.shape,
                          ema_decay=config.optim.get("ema_decay", 0.0), mesh=mesh),
        in_shardings=(self.shardings, self.param_shardings, parallel.replicated(mesh)),
        out_shardings=(self.shardings, parallel.replicated(mesh)), donate_argnums=0)

  def _state_from_teacher(self, teacher_params):
    return state_lib.distill_state(teacher_params, self.gen_tx, self.online_tx)

  @property
  def teacher_params(self):
    """Restored once, kept out of the train state, passed to the step undonated."""
    if self._teacher_params is None:
      self._teacher_params = restore_teacher_params(self.teacher_job, self.config.teacher)
    return self._teacher_params

  def init_state(self):
    return jax.jit(lambda p: parallel.unbox(self._state_from_teacher(p)),
                   out_shardings=self.shardings)(self.teacher_params)

  def train_step(self, state, step: int):
    del step  # the state's own step keys the randomness; FGM needs no data
    return self._step(state, self.teacher_params, jax.random.fold_in(self.base_rng, 2))

  def sampling_params(self, state, use_ema=True):
    return state.gen_ema_params if use_ema else state.gen_params

  def close(self):
    pass


def _teacher_run_config(config):
  """The nested teacher config, completed with the distill run's mesh and batch."""
  teacher = config.teacher.copy_and_resolve_references()
  with teacher.unlocked():
    teacher.mesh = config.mesh
  return teacher


def restore_teacher_params(teacher_job: TeacherJob, teacher_config):
  ckpt_dir = checkpoint.checkpoint_dir(teacher_config.workdir)
  step = checkpoint.latest_step(ckpt_dir)
  if step is None:
    raise checkpoint.CheckpointNotFoundError(
        f"config.teacher.workdir={teacher_config.workdir!r}: no teacher checkpoint in "
        f"{ckpt_dir}; train the teacher first.")
  saved = checkpoint.read_meta(ckpt_dir, step)
  config_checks.compare_with_saved(teacher_job.config, saved, teacher_config.workdir)
  mgr = checkpoint.manager(ckpt_dir, async_save=False)
  target = checkpoint.abstract_with_shardings(teacher_job.abstract_state,
                                              teacher_job.shardings)
  state, _ = checkpoint.restore(mgr, step, target)
  mgr.close()
  return teacher_job.sampling_params(state, teacher_config.get("use_ema", True))


def build(config, mesh):
  if config_checks.is_distill(config):
    return DistillJob(config, mesh)
  return TeacherJob(config, mesh)
