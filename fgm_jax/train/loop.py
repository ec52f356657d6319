"""The training loop shared by teacher and distill runs.

Resumes from the newest readable checkpoint in ``workdir``; randomness and data are keyed by
step, so a resumed run continues exactly as an uninterrupted one. Every process of a
multi-process run runs this loop in step; process 0 alone writes metrics, plots and logs
progress, and all processes save and restore checkpoints together.

Three ways a run ends early, each leaving a checkpoint a relaunch can use:
  * SIGTERM (a preemption, a scheduler's limit) or Ctrl-C on any process: every process
    finishes the same step, saves it, and ``TrainingStopped`` carries exit status 143 (130
    for Ctrl-C) for main, so schedulers requeue the job instead of reading "finished";
  * the state or the losses become non-finite: the step computes one "all finite" flag, read
    on save and log steps, and a non-finite state is never saved; ``TrainingDiverged`` names
    the newest (finite) checkpoint;
  * a damaged newest checkpoint: it is moved to ``checkpoints/corrupt-<step>`` with one log
    line and the run resumes from the newest readable one.
"""

import math

import jax
from absl import logging

from fgm_jax import checkpoint
from fgm_jax import compile_cache
from fgm_jax import config_checks
from fgm_jax import distributed
from fgm_jax import parallel
from fgm_jax import paths
from fgm_jax import workdir_lock
from fgm_jax.train import trainers
from fgm_jax.train import visualize

FINITE_KEY = "state_finite"  # the step's "every number of the new state is finite" flag


class TrainingDiverged(RuntimeError):
  pass


class TrainingStopped(Exception):
  """A run stopped early on request (SIGTERM, Ctrl-C), after saving ``step``."""

  def __init__(self, step: int, reason: str, exit_status: int, checkpoint_path: str):
    self.step, self.reason, self.exit_status = step, reason, exit_status
    super().__init__(f"stopped after step {step} ({reason}); saved {checkpoint_path}. Run "
                     "the same command again to resume from it.")


def _meta(config, step):
  return {"step": int(step), "data_position": int(step), "job": config.job,
          "fingerprint": config_checks.fingerprint(config), "config": config.to_dict()}


def prepare_workdir(config, workdir):
  """Checks that an existing checkpoint fits this config; writes config.json. Before compiling.

  Compares with the newest checkpoint whose metadata reads (a damaged one is set aside when
  the state is restored).
  """
  ckpt_dir = checkpoint.checkpoint_dir(workdir)
  for step in reversed(checkpoint.steps(ckpt_dir)):
    try:
      saved = checkpoint.read_meta(ckpt_dir, step)
    except checkpoint.CheckpointCorruptError:
      continue
    config_checks.compare_with_saved(config, saved, workdir)
    break
  checkpoint.as_path(workdir).mkdir(parents=True, exist_ok=True)
  if distributed.is_writer():
    checkpoint.write_json(str(checkpoint.as_path(workdir) / "config.json"),
                          {"fingerprint": config_checks.fingerprint(config),
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


def train(config, workdir, *, mesh=None, write_metrics=True, progress=True):
  """Runs (or resumes) ``config`` up to ``config.num_steps``; returns (trainer, final state).

  Raises TrainingStopped after a requested stop (SIGTERM, Ctrl-C) and TrainingDiverged when
  the run becomes non-finite; both leave only finite checkpoints behind. Holds the workdir's
  lock throughout (process 0): a second run on the same workdir stops at once.
  """
  with workdir_lock.held(workdir), compile_cache.for_run(config, workdir):
    return _train(config, workdir, mesh, write_metrics, progress)


def _train(config, workdir, mesh, write_metrics, progress):
  mesh = mesh or parallel.mesh_from_config(config.mesh)
  config = trainers.prepare(config, workdir)
  prepare_workdir(config, workdir)
  trainer = trainers.build(config, mesh)
  from fgm_jax.evaluation import evaluate  # evaluate imports this module
  fid_hook = evaluate.TrainingFID.for_run(trainer, config, workdir)  # None unless asked
  ckpt = config.checkpoint
  ckpt_dir = checkpoint.checkpoint_dir(workdir)
  mgr = checkpoint.manager(ckpt_dir, every=ckpt.every, keep=ckpt.keep,
                           async_save=ckpt.async_save)
  writer = None
  try:
    state, start = restore_newest_readable(trainer, mgr)
    total = config.num_steps
    writer = make_writer(workdir, write_metrics)
    report = (_progress_action(total, writer, config.log.every)
              if progress and distributed.is_writer() else None)
    plot_every = config.log.plot_every if write_metrics else 0
    last_saved = start or None
    with distributed.StopAgreement(start) as stop:
      for step in range(start, total):
        state, metrics = trainer.train_step(state, step)
        done = step + 1
        stopping = stop.should_stop(done)  # before anything below waits on the devices
        if report is not None:
          report(done)
        save = done % ckpt.every == 0 or done == total or stopping
        log = done % config.log.every == 0 or done == total
        if save or log:  # the only steps that read the devices
          values = {k: float(v) for k, v in jax.device_get(metrics).items()}
          _check_finite(values, done, last_saved, ckpt_dir)
          if log:
            _log_metrics(writer, done, values, progress)
        if save:
          checkpoint.save(mgr, done, state, _meta(config, done), force=True)
          last_saved = done
        if plot_every and (done % plot_every == 0 or done == total):
          visualize.write(trainer, state, done, workdir, writer)
        if fid_hook is not None:
          fid_hook(done, state, writer)
        if stopping:
          mgr.wait_until_finished()
          raise TrainingStopped(done, stop.reason, stop.exit_status,
                                str(checkpoint.step_path(ckpt_dir, done)))
  finally:
    trainer.close()
    mgr.wait_until_finished()  # an async save in flight completes (or fails) here
    mgr.close()
    if writer is not None:
      writer.close()  # a bucket run's events are uploaded here at the latest
  return trainer, state


def _progress_action(total, writer, every):
  from clu import periodic_actions
  return periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                         every_steps=every)


def _check_finite(values, step, last_saved, ckpt_dir):
  """Stops before a non-finite state can be saved; names the newest (finite) checkpoint."""
  state_finite = values.pop(FINITE_KEY, 1.0) == 1.0
  bad = [k for k, v in values.items() if not math.isfinite(v)]
  if state_finite and not bad:
    return
  what = ", ".join(bad + ([] if state_finite else ["the train state"]))
  if last_saved is None:
    newest = "no checkpoint was written, so a rerun starts from scratch"
  else:
    newest = (f"the newest checkpoint, step {last_saved} at "
              f"{checkpoint.step_path(ckpt_dir, last_saved)}, is finite and a rerun of the "
              "same command resumes from it")
  raise TrainingDiverged(
      f"training diverged: {what} became non-finite by step {step}; nothing non-finite was "
      f"saved and {newest}. Lower the learning rate (config.optim.lr) or enable gradient "
      "clipping (config.optim.grad_clip).")


def _log_metrics(writer, step, values, progress):
  if writer is not None:
    writer.write_scalars(step, values)
  elif progress and distributed.is_writer():
    logging.info("step %d: %s", step, values)
