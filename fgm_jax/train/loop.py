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
from fgm_jax import distributed
from fgm_jax import sharding as sharding_lib
from fgm_jax import workdir_lock
from fgm_jax.train import run_dir
from fgm_jax.train import trainers

FINITE_KEY = "state_finite"  # the step's "every number of the new state is finite" flag


class TrainingDiverged(RuntimeError):
  pass


class TrainingStopped(Exception):
  """A run stopped early on request (SIGTERM, Ctrl-C), after saving ``step``."""

  def __init__(self, step: int, reason: str, exit_status: int, checkpoint_path: str):
    self.step, self.reason, self.exit_status = step, reason, exit_status
    super().__init__(f"stopped after step {step} ({reason}); saved {checkpoint_path}. Run "
                     "the same command again to resume from it.")


def train(config, workdir, *, mesh=None, write_metrics=True, progress=True, hooks=None):
  """Runs (or resumes) ``config`` up to ``config.num_steps``; returns (trainer, final state).

  ``hooks(trainer, config, workdir)`` (e.g. evaluation/training_hooks.py:for_run) gives the
  per-step hooks, each called as ``hook(step, state, writer)`` after the step and its save,
  on every process (``writer`` is None off process 0 and without ``write_metrics``). The
  caller passes them so that the loop imports no evaluation code.

  Raises TrainingStopped after a requested stop (SIGTERM, Ctrl-C) and TrainingDiverged when
  the run becomes non-finite; both leave only finite checkpoints behind. Holds the workdir's
  lock throughout (process 0): a second run on the same workdir stops at once.
  """
  with workdir_lock.held(workdir), compile_cache.for_run(config, workdir):
    return _train(config, workdir, mesh, write_metrics, progress, hooks)


def _train(config, workdir, mesh, write_metrics, progress, make_hooks):
  mesh = mesh or sharding_lib.mesh_from_config(config.mesh)
  config = trainers.prepare(config, workdir)
  run_dir.prepare_workdir(config, workdir)
  trainer = trainers.build(config, mesh)
  hooks = make_hooks(trainer, config, workdir) if make_hooks else ()
  ckpt = config.checkpoint
  ckpt_dir = checkpoint.checkpoint_dir(workdir)
  mgr = checkpoint.manager(ckpt_dir, every=ckpt.every, keep=ckpt.keep,
                           async_save=ckpt.async_save)
  writer = None
  try:
    state, start = run_dir.restore_newest_readable(trainer, mgr)
    total = config.num_steps
    writer = run_dir.make_writer(workdir, write_metrics)
    report = (_progress_action(total, writer, config.log.every)
              if progress and distributed.is_writer() else None)
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
          checkpoint.save(mgr, done, state, run_dir.meta(config, done), force=True)
          last_saved = done
        for hook in hooks:
          hook(done, state, writer)
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
