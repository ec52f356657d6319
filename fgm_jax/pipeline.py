"""job=pipeline: train the teacher, distil it with FGM, evaluate both, write a report.

    python -m fgm_jax.main --config=configs/digits_fgm.py --workdir=runs/digits

Everything lives under --workdir, and every stage resumes, so rerunning the command after an
interruption continues where it stopped:

    <workdir>/teacher/         the teacher run (config.teacher, with job='teacher')
    <workdir>/fgm/             the FGM run (config, with job='train')
    <workdir>/eval.json        teacher Euler N-step and FGM 1-step metrics, same noise for all
    <workdir>/report.md        metrics table, wall time per stage, commands to reproduce
    <workdir>/grids.png        image data: labelled sample grids side by side
    <workdir>/samples.png      toy 2-D data: scatter panels
"""

import os
import time

import jax
from absl import logging

from fgm_jax import checkpoint
from fgm_jax import compile_cache
from fgm_jax import config_checks
from fgm_jax import sharding as sharding_lib
from fgm_jax import paths
from fgm_jax import train_job
from fgm_jax import workdir_lock
from fgm_jax.evaluation import evaluate as evaluate_lib
from fgm_jax.evaluation import plots
from fgm_jax.evaluation import report as report_lib

NUM_STAGES = 4


class _Progress:
  """One '[i/4] stage: message (elapsed)' line per event, timed from the pipeline's start."""

  def __init__(self):
    self.start = time.time()
    self.stage_start = self.start
    self.wall = {}

  def begin(self, index, name, message):
    self.stage_start = time.time()
    self._say(f"[{index}/{NUM_STAGES}] {name}: {message}")

  def end(self, index, name, message=""):
    self.wall[name] = time.time() - self.stage_start
    self._say(f"[{index}/{NUM_STAGES}] {name}: done in {self.wall[name]:.1f} s"
              + (f"; {message}" if message else ""))

  def _say(self, text):
    # stdout, apart from the log lines on stderr, so the stages stand out.
    if jax.process_index() == 0:
      print(f"{text} (elapsed {time.time() - self.start:.1f} s)", flush=True)


def stage_configs(config, workdir):
  """(teacher run config, FGM run config) for the two training stages.

  The teacher trains into <workdir>/teacher on the run's mesh; the FGM run reads it there.
  """
  fgm = config.copy_and_resolve_references()
  with fgm.unlocked():
    fgm.job = "train"
    fgm.teacher.workdir = os.path.join(workdir, "teacher")
    # Both stages share the pipeline's compilation cache (the teacher's samplers recur).
    fgm.compilation_cache.dir = compile_cache.directory(config, workdir)
  teacher = fgm.teacher.copy_and_resolve_references()
  with teacher.unlocked():
    teacher.job = "train"
    teacher.mesh = fgm.mesh
    teacher.compilation_cache = fgm.compilation_cache
  return teacher, fgm


def _train_stage(progress, index, name, config, workdir, mesh, need_state=True):
  """Trains (or resumes) one stage; a finished stage is only restored, and only if needed."""
  done = checkpoint.latest_step(checkpoint.checkpoint_dir(workdir)) or 0
  if done >= config.num_steps:
    progress.begin(index, name, f"already trained ({done} of {config.num_steps} steps) in "
                   f"{workdir}")
    if not need_state:
      progress.end(index, name)
      return None, None
  else:
    verb = f"resuming at step {done} of" if done else "training"
    progress.begin(index, name, f"{verb} {config.num_steps} steps in {workdir}")
  trainer, state = train_job.run(config, workdir, mesh=mesh)
  progress.end(index, name, f"step {int(state.step)}")
  return trainer, state


def run(config, workdir):
  """Teacher -> FGM -> evaluation -> report under ``workdir``; returns the results dict."""
  with workdir_lock.held(workdir):
    return _run(config, workdir)


def _run(config, workdir):
  progress = _Progress()
  teacher_config, fgm_config = stage_configs(config, workdir)
  config_checks.validate(teacher_config)  # the nested teacher's own fields (batch, steps, ...)
  mesh = sharding_lib.mesh_from_config(config.mesh)
  _train_stage(progress, 1, "teacher", teacher_config, teacher_config.workdir, mesh,
               need_state=False)  # the FGM run restores it itself
  fgm_dir = os.path.join(workdir, "fgm")
  trainer, state = _train_stage(progress, 2, "fgm", fgm_config, fgm_dir, mesh)
  results, sets, evaluator = _evaluate_stage(progress, config, trainer, state, fgm_dir)
  _report_stage(progress, config, workdir, results, sets, evaluator)
  return results


def _evaluate_stage(progress, config, trainer, state, fgm_dir):
  """FGM 1-step and teacher N-step from the same noise, scored, plus the real-data floor."""
  e = config.eval
  progress.begin(3, "evaluate", f"{e.num_samples} samples each: teacher "
                 f"{'/'.join(map(str, e.teacher_steps))}-step and FGM 1-step, same noise")
  metrics, sets, evaluator = evaluate_lib.measure(trainer, state, e, fgm_dir)
  params = trainer.teacher_params(state)
  results = {"fgm_step": int(state.step), "num_samples": e.num_samples, "seed": e.seed,
             "model_parameters": int(sum(x.size for x in jax.tree.leaves(params)))}
  if metrics is None:
    logging.warning("No metric for data.name=%r on this machine (FID needs Inception-V3 "
                    "weights); the report has samples only.", trainer.data_config.name)
  else:
    results["metrics"] = metrics
  progress.end(3, "evaluate", report_lib.summary(metrics, sets))
  return results, sets, evaluator


def _report_stage(progress, config, workdir, results, sets, evaluator):
  """eval.json, the sample picture and report.md (process 0 writes)."""
  progress.begin(4, "report", f"writing {os.path.join(workdir, 'report.md')}")
  reference = evaluator.reference_panel()
  panels = ([reference] if reference is not None else []) + list(sets)
  results["wall_time_s"] = dict(progress.wall)
  writer = jax.process_index() == 0
  picture = (plots.sample_sets_figure(panels, evaluator.picture, workdir) if writer else "")
  report = report_lib.markdown(config, workdir, results, sets, evaluator, picture,
                               progress.wall, time.time() - progress.start)
  if writer:
    paths.write_json(os.path.join(workdir, "eval.json"), results)
    paths.write_text(os.path.join(workdir, "report.md"), report)
  progress.end(4, "report", f"total {time.time() - progress.start:.1f} s")
  if writer:
    print(report, flush=True)
