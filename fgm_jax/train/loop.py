"""The training loop shared by teacher and distill runs.

Resumes from the latest complete checkpoint in ``workdir``; randomness and data are keyed by
step, so a resumed run continues exactly as an uninterrupted one. SIGTERM / Ctrl-C save a
checkpoint at the current step before exiting, so nothing is lost when a run is stopped.
"""

import math
import signal

import jax
from absl import logging

from fgm_jax import checkpoint
from fgm_jax import config_checks
from fgm_jax import parallel
from fgm_jax import workdir_lock
from fgm_jax.train import trainers
from fgm_jax.train import visualize


class TrainingDiverged(RuntimeError):
  pass


class _StopFlag:
  """Turns SIGTERM (preemption, `kill`) and a first Ctrl-C into a save-and-exit at the next
  step boundary (a step interrupted mid-flight would leave donated buffers behind). A second
  Ctrl-C interrupts at once."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.stop = False
    self._old = {}

  def __enter__(self):
    for sig in self.SIGNALS:
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (some notebook runners): no handler
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.stop and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.stop = True
    logging.warning("Signal %d: finishing this step, saving a checkpoint, then stopping.",
                    signum)

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _meta(config, step):
  return {"step": int(step), "data_position": int(step), "job": config.job,
          "fingerprint": config_checks.fingerprint(config), "config": config.to_dict()}


def prepare_workdir(config, workdir):
  """Checks that an existing checkpoint fits this config; writes config.json. Before compiling."""
  ckpt_dir = checkpoint.checkpoint_dir(workdir)
  step = checkpoint.latest_step(ckpt_dir)
  if step is not None:
    config_checks.compare_with_saved(config, checkpoint.read_meta(ckpt_dir, step), workdir)
  checkpoint.as_path(workdir).mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    checkpoint.write_json(str(checkpoint.as_path(workdir) / "config.json"),
                          {"fingerprint": config_checks.fingerprint(config),
                           "config": config.to_dict()})
  return step


def make_writer(workdir, enabled=True):
  if not enabled:
    return None
  from clu import metric_writers
  return metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)


def restore_or_init(trainer, mgr, step):
  if step is None:
    return trainer.init_state(), 0
  target = checkpoint.abstract_with_shardings(trainer.abstract_state, trainer.shardings)
  state, _ = checkpoint.restore(mgr, step, target)
  logging.info("Resumed from the checkpoint of step %d.", step)
  return state, step


def train(config, workdir, *, mesh=None, write_metrics=True, progress=True):
  """Runs (or resumes) ``config`` up to ``config.num_steps``; returns (trainer, final state).

  Holds the workdir's lock throughout: a second process on the same workdir stops at once.
  """
  with workdir_lock.held(workdir):
    return _train(config, workdir, mesh, write_metrics, progress)


def _train(config, workdir, mesh, write_metrics, progress):
  mesh = mesh or parallel.mesh_from_config(config.mesh)
  latest = prepare_workdir(config, workdir)
  trainer = trainers.build(config, mesh)
  ckpt = config.checkpoint
  mgr = checkpoint.manager(checkpoint.checkpoint_dir(workdir), every=ckpt.every,
                           keep=ckpt.keep, async_save=ckpt.async_save)
  state, start = restore_or_init(trainer, mgr, latest)
  total = config.num_steps
  writer = make_writer(workdir, write_metrics)
  report = _progress_action(total, writer, config.log.every) if progress else None
  plot_every = config.log.plot_every
  metrics, step = None, start
  with _StopFlag() as flag:
    for step in range(start, total):
      state, metrics = trainer.train_step(state, step)
      done = step + 1
      if report is not None:
        report(done)
      if done % config.log.every == 0 or done == total:
        _log_metrics(writer, done, metrics, progress)
      checkpoint.save(mgr, done, state, _meta(config, done), force=(done == total or flag.stop))
      if plot_every and (done % plot_every == 0 or done == total) and writer is not None:
        visualize.write(trainer, state, done, workdir, writer)
      if flag.stop:
        break
  trainer.close()
  mgr.wait_until_finished()
  mgr.close()
  if writer is not None:
    writer.flush()
  return trainer, state


def _progress_action(total, writer, every):
  from clu import periodic_actions
  return periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                         every_steps=every)


def _log_metrics(writer, step, metrics, progress):
  values = {k: float(v) for k, v in jax.device_get(metrics).items()}
  bad = [k for k, v in values.items() if not math.isfinite(v)]
  if bad:
    raise TrainingDiverged(
        f"{', '.join(bad)} became non-finite at step {step}; the last saved checkpoint is "
        "intact. Lower the learning rate (config.optim.lr) or enable clipping "
        "(config.optim.grad_clip) and resume.")
  if writer is not None:
    writer.write_scalars(step, values)
  elif progress:
    logging.info("step %d: %s", step, values)
