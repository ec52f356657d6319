"""The two trainers -- teacher (flow matching on data) and distill (FGM) -- behind one surface.

A trainer owns its model, the sharded layout of its train state and its jitted functions; the
loop (loop.py), the evaluators and the pipeline use only this surface, never the kind:

    trainer.config, .mesh, .model, .shape        the run's config and what it trains
    trainer.teacher_sample                       the teacher's sampler settings (steps, ...)
    trainer.data_config, trainer.data            the teacher's data (built lazily; None for
                                                 a teacher without data, e.g. SD3's)
    trainer.shardings, .abstract_state           the state's layout, for init and restore
    trainer.init_state(); trainer.train_step(state, step) -> (state, metrics); trainer.close()
    trainer.teacher_params(state)                the teacher's sampling parameters
    trainer.samples(state, n, seed, weights='ema') -> SampleSet  what it trains (config.sample)
    trainer.sample_sets(state, n, seed, teacher_steps, weights='ema') -> [SampleSet]  to compare
    trainer.traces                               how often each function was traced
    trainer.compile_targets(sample_batch) -> {name: (jitted, abstract args)}  for job=compile

Every function is traced under the run's mesh and logical-axis rules (sharding_lib.ShardingContext).
"""

import collections
import functools
from typing import Callable, NamedTuple

import jax
from absl import logging

from fgm_jax import checkpoint
from fgm_jax import checkpoint_compat
from fgm_jax import data as data_lib
from fgm_jax import models
from fgm_jax import sharding as sharding_lib
from fgm_jax.config_checks import ConfigError
from fgm_jax.data import arrays
from fgm_jax.models import lora as lora_lib
from fgm_jax.train import keys as keys_lib
from fgm_jax.train import kinds
from fgm_jax.train import optim
from fgm_jax.train import sampling
from fgm_jax.train import state as state_lib
from fgm_jax.train import steps


class Trainer:
  """What teacher and distill runs share: model, sharding context, samplers, teacher data."""

  def __init__(self, config, mesh, *, model_config, shape, teacher_sample, data_config,
               data_seed):
    self.config, self.mesh = config, mesh
    self.teacher_sample = teacher_sample
    self.data_config, self._data_seed = data_config, data_seed
    self.model = models.build(model_config)
    self.model_config = model_config
    self.shape = tuple(shape)
    self.keys = keys_lib.run_keys(config.seed)
    self.sharding = sharding_lib.ShardingContext(
        mesh, models.sharding_rules(config.mesh, model_config))
    self.batch_devices = sharding_lib.batch_device_count(mesh)
    self.traces = collections.Counter()
    self._samplers = {}
    self._data = None

  def _jit(self, name, fn, **jit_kwargs):
    """Jitted under the run's sharding context; counts its traces (a retrace is a bug)."""
    def counted(*args):
      self.traces[name] += 1
      return fn(*args)
    return self.sharding.jit(counted, **jit_kwargs)

  @property
  def data(self):
    if self._data is None:  # built lazily: sampling/evaluating a checkpoint needs no data
      if self.data_config is None:
        raise ValueError("this run's teacher has no data source (e.g. an SD3 folder).")
      self._data = data_lib.build(self.data_config, self._data_seed)
    return self._data

  def _init_params_boxed(self, rng=None):
    """Logically boxed parameters of a fresh model (the teacher's layout)."""
    batch = self.batch_devices  # a dummy batch the mesh can split
    cond = models.example_cond(self.model_config, batch)
    rng = self.keys.init if rng is None else rng
    return state_lib.init_params(self.model, rng, self.shape, cond, batch=batch)

  def _sampler(self, name, fn):
    """jit(fn(params, z)), one per name, params laid out like the teacher's, z over the batch."""
    if name not in self._samplers:
      batch = self.sharding.batch()
      self._samplers[name] = self._jit(name, fn, in_shardings=(self.param_shardings, batch),
                                       out_shardings=batch)
    return self._samplers[name]

  def _draw(self, name, fn, params, n, seed, chunk=4096):
    """Samples of ``fn(params, z)`` from the seed's noise; one jitted sampler per name."""
    sampler = functools.partial(self._sampler(name, fn), params)
    return sampling.draw(sampler, sampling.noise(n, self.shape, seed), chunk,
                         self.batch_devices, what=f"sampling {name}")

  def _teacher_ode_sampler(self, num_steps):
    s = self.teacher_sample
    fn = functools.partial(_teacher_ode_fn, model=self.model, num_steps=num_steps,
                           method=s.method, shift=s.shift)
    return f"teacher_{s.method}_{num_steps}step", fn

  def _teacher_ode(self, params, n, seed, num_steps):
    name, fn = self._teacher_ode_sampler(num_steps)
    x = self._draw(name, fn, params, n, seed)
    return sampling.teacher_set(self.teacher_sample.method, num_steps, x)

  def teacher_samples(self, state, n, seed, num_steps):
    return self._teacher_ode(self.teacher_params(state), n, seed, num_steps)

  def sample_sets(self, state, n, seed, teacher_steps, weights="ema"):
    """The teacher's N-step sets, in ``teacher_steps`` order, all from the same noise."""
    del weights  # (FGM runs draw their generator's set with these weights)
    return [self.teacher_samples(state, n, seed, k) for k in teacher_steps]

  def close(self):
    pass

  # --- ahead-of-time compilation (aot.py): the run's jitted functions on abstract inputs

  def _abstract(self, shape, dtype, sharding):
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)

  def _abstract_tree(self, tree, shardings, dtype=None):
    return jax.tree.map(lambda a, s: self._abstract(a.shape, dtype or a.dtype, s), tree,
                        shardings)

  def _abstract_key(self, key):
    return self._abstract(key.shape, key.dtype, self.sharding.replicated())

  def _abstract_noise(self, batch):
    return self._abstract((batch,) + tuple(self.shape), jax.numpy.float32,
                          self.sharding.batch())

  def _sampler_targets(self, params, sample_batch):
    """The teacher's ODE sampler with the steps the run samples with (config.sample)."""
    name, fn = self._teacher_ode_sampler(self.teacher_sample.steps)
    return {name: (self._sampler(name, fn).jitted, (params, self._abstract_noise(sample_batch)))}

  def compile_targets(self, sample_batch):
    """{name: (jitted function, abstract arguments with shardings)}: what the run compiles."""
    raise NotImplementedError


def _teacher_ode_fn(params, z, *, model, num_steps, method, shift):
  return steps.teacher_sample(model, params, z, num_steps, method, shift)


def _generator_fn(params, z, *, model, t_star):
  return steps.generate(model, params, z, t_star)


class TeacherTrainer(Trainer):
  """Flow matching of ``config.model`` on ``config.data``."""

  def __init__(self, config, mesh):
    super().__init__(config, mesh, model_config=config.model,
                     shape=data_lib.example_shape(config.data), teacher_sample=config.sample,
                     data_config=config.data, data_seed=config.seed)
    self.tx = optim.make_optimizer(config.optim, models.frozen_params(config.model))
    self.boxed_state = self.sharding.eval_shape(self._init_boxed)
    self.shardings = self.sharding.shardings(self.boxed_state)
    self.param_shardings = self.shardings.params
    self.abstract_state = sharding_lib.unbox(self.boxed_state)
    self._init = self._jit("init", lambda: sharding_lib.unbox(self._init_boxed()),
                           out_shardings=self.shardings)
    self._step = self._jit(
        "train_step",
        functools.partial(steps.teacher_step, model=self.model, tx=self.tx,
                          flow_config=config.flow, ema_decay=config.optim.ema_decay, mesh=mesh),
        in_shardings=(self.shardings, self.sharding.batch(), self.sharding.replicated()),
        out_shardings=(self.shardings, self.sharding.replicated()), donate_argnums=0)
    self._batches = None

  def _init_boxed(self):
    return state_lib.teacher_state(self._init_params_boxed(), self.tx)

  def init_state(self):
    return self._init()

  def train_step(self, state, step: int):
    if self._batches is None:
      self._batches = arrays.StepStream(self.data, self.config.batch_size, jax.process_index(),
                                        jax.process_count())
    batch = sharding_lib.global_batch(self._batches(step), self.mesh)
    return self._step(state, batch, self.keys.teacher_step)

  def close(self):
    if self._batches is not None:
      self._batches.close()
      self._batches = None

  def teacher_params(self, state, use_ema=True):
    return state.ema_params if use_ema else state.params

  def compile_targets(self, sample_batch):
    state = self._abstract_tree(self.abstract_state, self.shardings)
    batch = self._abstract((self.config.batch_size,) + tuple(self.shape), jax.numpy.float32,
                           self.sharding.batch())
    targets = {"train_step": (self._step.jitted,
                              (state, batch, self._abstract_key(self.keys.teacher_step)))}
    params = self._abstract_tree(self.abstract_state.params, self.param_shardings)
    return {**targets, **self._sampler_targets(params, sample_batch)}

  def samples(self, state, n, seed, weights="ema"):
    """The teacher's ODE with config.sample's steps and method ('ema' or 'raw' weights)."""
    return self._teacher_ode(self.teacher_params(state, weights != "raw"), n, seed,
                             self.config.sample.steps)


class CheckpointTeacher:
  """A teacher that is a finished teacher run (config.teacher.workdir; also what
  fgm_jax.convert.rectified_flow writes): its checkpoint's EMA or raw parameters.

  What a teacher source gives a FGMTrainer: ``model_config`` (the architecture of all
  three networks), ``shape`` (one example), ``sample`` (the teacher's sampler settings),
  ``data_config``/``data_seed`` (its data, for evaluation; None when it has none) and
  ``load(mesh)`` -> its parameters in the model's layout. ``sd3/trainer.py``'s FolderTeacher is
  the other one.
  """

  def __init__(self, config):
    self.run_config = _teacher_run_config(config)
    self.model_config = config.teacher.model
    self.shape = data_lib.example_shape(config.teacher.data)
    self.sample = self.run_config.sample
    self.data_config, self.data_seed = config.teacher.data, config.teacher.seed

  def load(self, mesh):
    layout = TeacherTrainer(self.run_config, mesh)  # the checkpoint's layout: a teacher run's
    return restore_teacher_params(layout, self.run_config)


class FGMTrainer(Trainer):
  """FGM: one-step generator from a frozen teacher ``source`` (default: the teacher run
  named by ``config.teacher``, CheckpointTeacher).

  ``cond_source`` (optional): a step-keyed source of conditioning rows (e.g. prompt
  embeddings, ``data.arrays.RowSource``); each iteration then draws one global batch of them
  and all three networks see it. Without one the step is data-free and unconditional.
  ``null_cond`` (optional, leading axis 1): the unconditional embedding; with it the teacher
  is guided with ``config.fgm.guidance``.
  """

  def __init__(self, config, mesh, teacher_params=None, cond_source=None, null_cond=None,
               source=None):
    self.source = source or CheckpointTeacher(config)
    s = self.source
    super().__init__(config, mesh, model_config=s.model_config, shape=s.shape,
                     teacher_sample=s.sample, data_config=s.data_config, data_seed=s.data_seed)
    frozen = models.frozen_params(s.model_config)
    self.gen_tx = optim.make_optimizer(config.optim, frozen)
    self.online_tx = optim.make_optimizer(config.online_optim, frozen)
    self.teacher_dtype = config.fgm.teacher_dtype
    # config.lora: generator and online flow as adapters over the frozen teacher (lora.py).
    self.lora = lora_lib.from_config(config.lora, models.lora_targets(s.model_config))
    boxed_teacher = self.sharding.eval_shape(self._init_params_boxed)  # the model's layout
    if self.lora is not None:  # (the shapes are known here, before anything compiles)
      problem = self.lora.rank_problem(boxed_teacher)
      if problem:
        raise ConfigError(problem)
    self.abstract_teacher = sharding_lib.unbox(boxed_teacher)
    boxed = self.sharding.eval_shape(self._state_from_teacher, boxed_teacher)
    self.shardings = self.sharding.shardings(boxed)
    self.param_shardings = self.sharding.shardings(boxed_teacher)
    self.abstract_state = sharding_lib.unbox(boxed)
    self._frozen_teacher = (None if teacher_params is None
                            else self._place_teacher(teacher_params))
    self.cond_source = cond_source
    self.null_cond = (None if null_cond is None
                      else jax.device_put(null_cond, self.sharding.replicated()))
    self._conds = None
    # A fine-tuning stage's init also takes the first run's generator (init_state).
    first_run = (self.shardings.gen_params,) if config.fgm.init_generator == "run" else ()
    self._init = self._jit(
        "init", lambda p, *g: sharding_lib.unbox(self._state_from_teacher(p, *g)),
        in_shardings=(self.param_shardings,) + first_run, out_shardings=self.shardings)
    self._step = self._jit(
        "train_step",
        functools.partial(steps.fgm_step, model=self.model, gen_tx=self.gen_tx,
                          online_tx=self.online_tx, fgm_config=config.fgm,
                          batch_size=config.batch_size, shape=self.shape,
                          ema_decay=config.optim.ema_decay, mesh=mesh, compose=self._compose),
        in_shardings=(self.shardings, self.param_shardings, self.sharding.batch(),
                      self.sharding.replicated(), self.sharding.replicated(),
                      self.sharding.batch()),
        out_shardings=(self.shardings, self.sharding.replicated()), donate_argnums=0)
    self._reals = None

  def _state_from_teacher(self, teacher_params, generator=None):
    """Generator and online flow from the teacher (DESIGN.md), or -- for the initialisation
    ablations, config.fgm.init_generator / init_online = 'random' -- from the model's own
    random initialisation (distinct keys for the two). A fine-tuning stage
    (init_generator='run') starts its generator from ``generator``, the first run's weights
    (None while only shapes are traced: the teacher's are the same)."""
    f = self.config.fgm
    start = {name: teacher_params if choice in ("teacher", "run") else self._init_params_boxed(
        jax.random.fold_in(self.keys.init, tag))
             for name, choice, tag in (("gen", f.init_generator, 1),
                                       ("online", f.init_online, 2))}
    if generator is not None:
      start["gen"] = generator
    if self.lora is not None:  # adapters over the one frozen teacher; B = 0: the teacher
      start = {name: self.lora.init(teacher_params, jax.random.fold_in(self.keys.init, tag))
               for name, tag in (("gen", 1), ("online", 2))}
    return state_lib.fgm_state(start["gen"], self.gen_tx, self.online_tx,
                                   ema=self.config.optim.ema_decay > 0,
                                   extra_emas=optim.extra_ema_names(self.config.optim),
                                   online_params=start["online"])

  def _compose(self, trainable, teacher_params):
    """The params the model applies for a trained network: its own, or (LoRA) its adapters
    beside the frozen teacher's kernels (steps.fgm_step's compose)."""
    return trainable if self.lora is None else self.lora.compose(trainable, teacher_params)

  def network_weights(self, trainable):
    """A trained network's weights as one tree of the teacher's shape: its own, or (LoRA)
    the frozen teacher's with the adapters merged (W + s A B; samplers, exports)."""
    return trainable if self.lora is None else self.lora.merge(trainable, self.frozen_teacher)

  def _place_teacher(self, params):
    """On the devices in ``config.fgm.teacher_dtype`` (bf16 halves a frozen SD3 teacher)."""
    dtype = jax.numpy.dtype(self.teacher_dtype)
    params = jax.tree.map(lambda x: x.astype(dtype) if x.dtype != dtype else x, params)
    return jax.device_put(params, self.param_shardings)

  @property
  def frozen_teacher(self):
    """Restored once, kept out of the train state, passed to the step undonated."""
    if self._frozen_teacher is None:
      self._frozen_teacher = self._place_teacher(self.source.load(self.mesh))
    return self._frozen_teacher

  def teacher_params(self, state=None):
    del state  # the teacher is frozen: the same whatever the state
    return self.frozen_teacher

  def init_state(self):
    return self._init(self.frozen_teacher, *self._first_run_generator())

  def _first_run_generator(self):
    """(), or for a fine-tuning stage (the weights config.fgm.init_weights of the finished
    run config.fgm.init_run,): its generator's alone (checkpoint_compat.check_first_stage
    checked that they fit, before anything compiled)."""
    f = self.config.fgm
    if f.init_generator != "run":
      return ()
    ckpt_dir = checkpoint.checkpoint_dir(f.init_run)
    params, weights = read_generator(self, ckpt_dir, checkpoint.latest_step(ckpt_dir),
                                     f.init_weights)
    logging.info("Generator from the %s weights of %s (a fine-tuning stage).", weights,
                 f.init_run)
    return (params,)

  def train_step(self, state, step: int):
    # The state's own step keys the randomness; conditioning (if any) is keyed by step.
    cond = None
    if self.cond_source is not None:
      if self._conds is None:
        self._conds = arrays.StepStream(self.cond_source, self.config.batch_size,
                                        jax.process_index(), jax.process_count())
      cond = sharding_lib.global_batch(self._conds(step), self.mesh)
    return self._step(state, self.frozen_teacher, cond, self.keys.fgm_step, self.null_cond,
                      self._real_batch(step))

  def _real_batch(self, step: int):
    """RealUID's real examples of iteration ``step`` (None when config.fgm.real_data is off):
    the teacher's data source read as a second step-keyed stream, one batch per online
    update, each process reading its slice (as the teacher job does), so resume is exact."""
    if not self.config.fgm.real_data.enabled:
      return None
    if self._reals is None:
      self._reals = arrays.StepStream(self.data, self._real_rows(), jax.process_index(),
                                      jax.process_count())
    return sharding_lib.global_batch(self._reals(step), self.mesh)

  def _real_rows(self):
    return self.config.batch_size * self.config.fgm.online_steps

  def close(self):
    for stream in (self._conds, self._reals):
      if stream is not None:
        stream.close()
    self._conds = self._reals = None

  def samples(self, state, n, seed, weights="ema"):
    """The one-step generator's samples with its ``weights`` ('ema', 'raw', 'ema_<decay>')."""
    params = state_lib.generator_params(state, weights)
    return self.generator_samples(params, n, seed)

  def generator_samples(self, params, n, seed):
    """The one-step generator's samples from its weights alone (read_generator's)."""
    params = self.network_weights(params)
    fn = functools.partial(_generator_fn, model=self.model, t_star=self.config.fgm.t_star)
    return sampling.generator_set(self._draw("generator", fn, params, n, seed))

  def sample_sets(self, state, n, seed, teacher_steps, weights="ema"):
    """The teacher's N-step sets, then the FGM 1-step set, all from the same noise."""
    return (super().sample_sets(state, n, seed, teacher_steps)
            + [self.samples(state, n, seed, weights)])

  def _abstract_teacher(self):
    """The frozen teacher as the step receives it: config.fgm.teacher_dtype, laid out."""
    return self._abstract_tree(self.abstract_teacher, self.param_shardings,
                               jax.numpy.dtype(self.teacher_dtype))

  def _abstract_cond(self, batch):
    """Conditioning rows of ``batch`` examples (None for data-free unconditional runs)."""
    return None

  def _abstract_null(self):
    return None

  def _abstract_real(self):
    if not self.config.fgm.real_data.enabled:
      return None
    return self._abstract((self._real_rows(),) + tuple(self.shape), jax.numpy.float32,
                          self.sharding.batch())

  def compile_targets(self, sample_batch):
    state = self._abstract_tree(self.abstract_state, self.shardings)
    args = (state, self._abstract_teacher(), self._abstract_cond(self.config.batch_size),
            self._abstract_key(self.keys.fgm_step), self._abstract_null(), self._abstract_real())
    targets = {"train_step": (self._step.jitted, args)}
    # The generator as samplers get it (network_weights): fp32, the teacher's shapes.
    gen = self._abstract_tree(self.abstract_teacher, self.param_shardings)
    targets["generator"] = self._generator_target(gen, sample_batch)
    return {**targets, **self._sampler_targets(self._abstract_teacher(), sample_batch)}

  def _generator_target(self, gen, sample_batch):
    fn = functools.partial(_generator_fn, model=self.model, t_star=self.config.fgm.t_star)
    return self._sampler("generator", fn).jitted, (gen, self._abstract_noise(sample_batch))


def _teacher_run_config(config):
  """The nested teacher config, completed with the distill run's mesh and batch."""
  teacher = config.teacher.copy_and_resolve_references()
  with teacher.unlocked():
    teacher.mesh = config.mesh
  return teacher


def read_generator(layout: FGMTrainer, ckpt_dir, step, weights="ema"):
  """(params, name) of the generator weights ``weights`` of checkpoint ``step``, placed as
  ``layout`` (a trainer of the run's architecture) lays them out. Only that branch of the
  saved FGMState is read: not the online flow, the optimizer states or the other weights
  (checkpoint.read_branches). 'ema' of a run that keeps no EMA gives its raw weights."""
  held = state_lib.saved_weights(checkpoint.saved_tree(ckpt_dir, step))
  if weights == "ema" and "ema" not in held:
    weights = "raw"
  if weights not in held:
    raise ConfigError(
        f"weights={weights!r}: checkpoint step {step} in {ckpt_dir} holds no such generator "
        f"weights; it holds {held}.")
  branch = state_lib.generator_branch(weights)
  target = checkpoint.abstract_with_shardings(layout.abstract_state.gen_params,
                                              layout.shardings.gen_params)
  for key in reversed(branch):
    target = {key: target}
  restored = checkpoint.read_branches(ckpt_dir, step, target)
  for key in branch:
    restored = restored[key]
  return restored, weights


def restore_teacher_params(teacher_layout: TeacherTrainer, teacher_config):
  ckpt_dir = checkpoint.checkpoint_dir(teacher_config.workdir)
  step = checkpoint.latest_step(ckpt_dir)
  if step is None:
    raise checkpoint.CheckpointNotFoundError(
        f"config.teacher.workdir={teacher_config.workdir!r}: no teacher checkpoint in "
        f"{ckpt_dir}; train the teacher first.")
  saved = checkpoint.read_meta(ckpt_dir, step)
  checkpoint_compat.compare_with_saved(teacher_layout.config, saved, teacher_config.workdir)
  mgr = checkpoint.manager(ckpt_dir, async_save=False)
  target = checkpoint.abstract_with_shardings(teacher_layout.abstract_state,
                                              teacher_layout.shardings)
  state, _ = checkpoint.restore(mgr, step, target)
  mgr.close()
  return teacher_layout.teacher_params(state, teacher_config.use_ema)


class TrainerKind(NamedTuple):
  """What a run kind (config.trainer, kinds.py) gives the loop, the pipeline and job=compile.

  build(config, mesh) -> Trainer               a trainer with its weights (teacher, data)
  build_abstract(config, mesh) -> Trainer      shapes and jitted functions only (job=compile)
  prepare(config, workdir) -> config           fields filled at run time (e.g. from a folder)
  prepare_architecture(config, workdir)        ``prepare`` without reading data (job=compile)
  """
  build: Callable
  build_abstract: Callable
  prepare: Callable = lambda config, workdir: config
  prepare_architecture: Callable = lambda config, workdir: config


TEACHER = TrainerKind(build=TeacherTrainer, build_abstract=TeacherTrainer)
FGM = TrainerKind(build=FGMTrainer, build_abstract=FGMTrainer)


def kind(config) -> TrainerKind:
  return kinds.resolve(config.trainer)


def prepare(config, workdir):
  """The config a run trains with (an SD3 FGM config gets its architecture from the SD3
  folder and, for ':runlocal', its tiny folder and prompt cache; others are unchanged)."""
  return kind(config).prepare(config, workdir)


def build_abstract(config, workdir, mesh):
  """(config, trainer) for job=compile: shapes and jitted functions only; no checkpoint,
  data, teacher weights or prompt cache is read."""
  k = kind(config)
  config = k.prepare_architecture(config, workdir)
  return config, k.build_abstract(config, mesh)


def build(config, mesh):
  return kind(config).build(config, mesh)
