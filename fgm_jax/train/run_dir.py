"""A run's directory: its config.json, checkpoint metadata, metrics writer and restored state.

What the training loop, job=sample/evaluate/export and the importers read from and write to a
workdir. It sits below all of them (they import it, it imports none of them), so evaluation
and export reach a run's state without importing the loop.
"""

from typing import Any, NamedTuple

from absl import logging

from fgm_jax import checkpoint
from fgm_jax import checkpoint_compat
from fgm_jax import config_checks
from fgm_jax import distributed
from fgm_jax import sharding as sharding_lib
from fgm_jax import paths
from fgm_jax.train import trainers


def meta(config, step):
  """The metadata saved beside each checkpoint (and read back by compare_with_saved)."""
  return {"step": int(step), "data_position": int(step), "job": config.job,
          "fingerprint": checkpoint_compat.fingerprint(config), "config": config.to_dict()}


def prepare_workdir(config, workdir):
  """Checks that an existing checkpoint fits this config; writes config.json. Before compiling.

  Compares with the newest checkpoint whose metadata reads (a damaged one is set aside when
  the state is restored). A fresh fine-tuning stage checks its first run instead (a resumed
  one no longer reads it).
  """
  ckpt_dir = checkpoint.checkpoint_dir(workdir)
  for step in reversed(checkpoint.steps(ckpt_dir)):
    try:
      saved = checkpoint.read_meta(ckpt_dir, step)
    except checkpoint.CheckpointCorruptError:
      continue
    checkpoint_compat.compare_with_saved(config, saved, workdir)
    break
  else:
    checkpoint_compat.check_first_stage(config)
  checkpoint.as_path(workdir).mkdir(parents=True, exist_ok=True)
  if distributed.is_writer():
    checkpoint.write_json(str(checkpoint.as_path(workdir) / "config.json"),
                          {"fingerprint": checkpoint_compat.fingerprint(config),
                           "config": config.to_dict()})


def make_writer(workdir, enabled=True):
  """TensorBoard + log lines, on process 0 only (the others' metrics are the same)."""
  if not enabled or not distributed.is_writer():
    return None
  if paths.is_remote(workdir):  # TensorFlow's own GCS writer is not the tested path layer
    return paths.MirroredWriter(workdir)
  from clu import metric_writers
  return metric_writers.create_default_writer(workdir)


def restore_or_init(trainer, mgr, step):
  """The state of ``step`` (CheckpointCorruptError if it cannot be read), or a fresh one."""
  if step is None:
    return trainer.init_state(), 0
  state, _ = checkpoint.restore(mgr, step, _target(trainer))
  logging.info("Resumed from the checkpoint of step %d.", step)
  return state, step


def _target(trainer):
  return checkpoint.abstract_with_shardings(trainer.abstract_state, trainer.shardings)


def restore_newest_readable(trainer, mgr):
  """(state, step) of the newest checkpoint every process can read, or a fresh state.

  A step that fails on any process is moved to ``checkpoints/corrupt-<step>`` (by process 0,
  while the others wait) with one log line, and the next older one is tried.
  """
  ckpt_dir = str(mgr.directory)
  target = _target(trainer)
  for step in sorted(mgr.all_steps(), reverse=True):
    try:
      state, _ = checkpoint.read(ckpt_dir, step, target)
      error = None
    except checkpoint.CheckpointCorruptError as e:
      state, error = None, e
    if distributed.all_succeeded(error is None):
      logging.info("Resumed from the checkpoint of step %d.", step)
      return state, step
    if distributed.is_writer():
      moved = checkpoint.set_aside(ckpt_dir, step)
      cause = f" ({error.cause})" if error is not None else " (on another process)"
      logging.warning("Checkpoint step %d at %s cannot be read%s; moved it to %s and "
                      "resuming from the previous checkpoint.", step,
                      checkpoint.step_path(ckpt_dir, step), cause, moved)
    distributed.barrier(f"set_aside_{step}")
    mgr.reload()
  return trainer.init_state(), 0


def newest_step(workdir) -> int:
  """The newest checkpoint's step in ``workdir``, or a clear error."""
  ckpt_dir = checkpoint.checkpoint_dir(workdir)
  step = checkpoint.latest_step(ckpt_dir)
  if step is None:
    raise checkpoint.CheckpointNotFoundError(
        f"--workdir={workdir} holds no checkpoint (looked in {ckpt_dir}). Train first with "
        f"--config.job=train and the same --workdir, or point "
        "--workdir at a finished run.")
  return step


def restore_latest(config, workdir, mesh=None):
  """(trainer, state) of the newest checkpoint in ``workdir``, or a clear error."""
  mesh = mesh or sharding_lib.mesh_from_config(config.mesh)
  ckpt_dir = checkpoint.checkpoint_dir(workdir)
  step = newest_step(workdir)
  checkpoint_compat.compare_with_saved(config, checkpoint.read_meta(ckpt_dir, step), workdir)
  trainer = trainers.build(config, mesh)
  mgr = checkpoint.manager(ckpt_dir, async_save=False)
  state, _ = restore_or_init(trainer, mgr, step)
  mgr.close()
  return trainer, state


class RestoredGenerator(NamedTuple):
  config: Any  # the run's config as prepared for its kind (e.g. an SD3 folder's sizes)
  trainer: Any  # shapes and jitted functions only: no teacher, data or prompt cache
  params: Any  # the generator's weights, laid out on the devices
  step: int
  weights: str  # which weights those are ('ema' of a run without EMA gives 'raw')


def restore_generator(config, workdir, weights="ema", mesh=None) -> RestoredGenerator:
  """The generator weights ``weights`` ('ema', 'raw', 'ema_<decay>') of the newest checkpoint
  of the FGM run in ``workdir``, read alone: not the online flow, the optimizer states, the
  other weights or the teacher (what job=sample and job=export need)."""
  mesh = mesh or sharding_lib.mesh_from_config(config.mesh)
  step = newest_step(workdir)
  config, trainer = trainers.build_abstract(config, workdir, mesh)
  ckpt_dir = checkpoint.checkpoint_dir(workdir)
  checkpoint_compat.compare_with_saved(config, checkpoint.read_meta(ckpt_dir, step), workdir)
  params, weights = trainers.read_generator(trainer, ckpt_dir, step, weights)
  logging.info("Read the %s generator weights of the checkpoint of step %d.", weights, step)
  return RestoredGenerator(config, trainer, params, step, weights)
