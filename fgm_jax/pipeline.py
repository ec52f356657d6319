"""job=pipeline: train the teacher, distil it with FGM, evaluate both, write a report.

    python -m fgm_jax.main --config=configs/digits_fgm.py --workdir=runs/digits

Everything lives under --workdir, and every stage resumes, so rerunning the command after an
interruption continues where it stopped:

    <workdir>/teacher/         the teacher run (config.teacher, with job='teacher')
    <workdir>/fgm/             the FGM run (config, with job='distill')
    <workdir>/eval.json        teacher Euler N-step and FGM 1-step metrics, same noise for all
    <workdir>/report.md        metrics table, wall time per stage, commands to reproduce
    <workdir>/grids.png        image data: labelled sample grids side by side
    <workdir>/samples.png      toy 2-D data: scatter panels
"""

import os
import platform
import shlex
import sys
import time

import jax
from absl import logging

from fgm_jax import checkpoint
from fgm_jax import config_checks
from fgm_jax import parallel
from fgm_jax.evaluation import jobs as eval_jobs
from fgm_jax.evaluation import plots
from fgm_jax.train import loop

NUM_STAGES = 4
GRID_IMAGES = 64  # per panel: an 8 x 8 grid
SCATTER_POINTS = 5000


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
  """(teacher run config, distill run config) for the two training stages.

  The teacher trains into <workdir>/teacher on the run's mesh; the distill run reads it there.
  """
  distill = config.copy_and_resolve_references()
  with distill.unlocked():
    distill.job = "distill"
    distill.teacher.workdir = os.path.join(workdir, "teacher")
  teacher = distill.teacher.copy_and_resolve_references()
  with teacher.unlocked():
    teacher.job = "teacher"
    teacher.mesh = distill.mesh
  return teacher, distill


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
  job, state = loop.train(config, workdir, mesh=mesh)
  progress.end(index, name, f"step {int(state.step)}")
  return job, state


def run(config, workdir):
  """Teacher -> FGM -> evaluation -> report under ``workdir``; returns the metrics dict."""
  progress = _Progress()
  teacher_cfg, distill_cfg = stage_configs(config, workdir)
  config_checks.validate(teacher_cfg)  # the nested teacher's own fields (batch, steps, ...)
  mesh = parallel.mesh_from_config(config.mesh)

  _train_stage(progress, 1, "teacher", teacher_cfg, teacher_cfg.workdir, mesh,
               need_state=False)  # the distill run restores it itself
  fgm_dir = os.path.join(workdir, "fgm")
  job, state = _train_stage(progress, 2, "distill", distill_cfg, fgm_dir, mesh)

  e = config.eval
  progress.begin(3, "evaluate", f"{e.num_samples} samples each: teacher "
                 f"{'/'.join(map(str, e.teacher_steps))}-step and FGM 1-step, same noise")
  results, sets = evaluate(job, state, config, workdir)
  progress.end(3, "evaluate", _summary(results))

  progress.begin(4, "report", f"writing {os.path.join(workdir, 'report.md')}")
  picture = write_picture(job, sets, workdir)
  results["wall_time_s"] = dict(progress.wall)
  report = report_markdown(config, workdir, results, picture, progress.wall,
                           time.time() - progress.start)
  if jax.process_index() == 0:
    checkpoint.write_json(os.path.join(workdir, "eval.json"), results)
    with open(os.path.join(workdir, "report.md"), "w") as f:
      f.write(report)
  progress.end(4, "report", f"total {time.time() - progress.start:.1f} s")
  if jax.process_index() == 0:
    print(report, flush=True)
  return results


# --- evaluation ------------------------------------------------------------------------------


def evaluate(job, state, config, workdir):
  """(metrics, sample sets): FGM 1-step and teacher N-step from the same noise, plus the floor.

  Data without a metric here (tfds images need FID) gets samples and pictures only.
  """
  e = config.eval
  data_config = config.teacher.data
  metrics, sets = eval_jobs.measure(job, state, data_config, e,
                                    os.path.join(workdir, "digits_classifier"))
  results = {"fgm_step": int(state.step), "num_samples": e.num_samples, "seed": e.seed,
             "model_parameters": int(sum(x.size for x in jax.tree.leaves(job.teacher_params)))}
  if metrics is None:
    logging.warning("No metric for data.name=%r on this machine (FID needs Inception-V3 "
                    "weights); the report has samples only.", data_config.name)
  else:
    results["metrics"] = metrics
  return results, sets


def _summary(results):
  metrics = results.get("metrics", {})
  return "; ".join(f"{_label(k)} {_fmt(v)}" for k, v in metrics.items()) or "no metric"


def _label(key):
  """'teacher_euler_4step' -> 'teacher 4-step euler'; 'fgm_1step' -> 'FGM 1-step'."""
  if key == "fgm_1step":
    return "FGM 1-step"
  if key == "real_data":
    return "real data"
  _, method, steps = key.split("_")
  return f"teacher {steps[:-4]}-step {method}"


def _fmt(metrics):
  return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())


# --- pictures --------------------------------------------------------------------------------


def _ordered_panels(sets):
  """Teacher panels (in eval.teacher_steps order), then FGM: how a reader compares them."""
  teacher = [k for k in sets if k != "fgm_1step"]
  keys = teacher + (["fgm_1step"] if "fgm_1step" in sets else [])
  return {_label(k): sets[k] for k in keys}


def _real_panel(job):
  """A panel of real data for reference, or {} where that is not cheap (tfds images)."""
  data_config = job.teacher_job.config.data
  if data_config.name == "toy2d":
    return {"data": job.teacher_job.data.reference(SCATTER_POINTS)}
  if data_config.name == "digits":
    from fgm_jax.data import digits
    return {"real (held-out)": digits.load_split("test")[0][:GRID_IMAGES]}
  return {}


def write_picture(job, sets, workdir):
  """samples.png (2-D scatter) or grids.png (image grids); returns the file name."""
  panels = {**_real_panel(job), **_ordered_panels(sets)}
  if job.shape == (2,):
    path = os.path.join(workdir, "samples.png")
    if jax.process_index() == 0:
      plots.scatter_panels({k: v[:SCATTER_POINTS] for k, v in panels.items()}, path=path)
    return os.path.basename(path)
  path = os.path.join(workdir, "grids.png")
  if jax.process_index() == 0:
    labelled_grids({k: plots.image_grid(v[:GRID_IMAGES], ncols=8) for k, v in panels.items()},
                   path)
  return os.path.basename(path)


def labelled_grids(grids, path, panel_inches=3.2):
  """Image grids side by side, each titled with its name, saved as a PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(grids), figsize=(panel_inches * len(grids),
                                                   panel_inches + 0.4), squeeze=False)
  for ax, (name, grid) in zip(axes[0], grids.items()):
    # Nearest-neighbour keeps 8x8 digits crisp instead of smearing them.
    ax.imshow(grid, interpolation="nearest")
    ax.set_title(name, fontsize=10)
    ax.set_xticks([]), ax.set_yticks([])
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)


# --- report ----------------------------------------------------------------------------------


def _machine():
  devices = jax.devices()
  kind = devices[0].device_kind if devices else "?"
  return (f"{len(devices)} x {jax.default_backend()} ({kind}), {os.cpu_count()} CPU cores, "
          f"{platform.machine()}; jax {jax.__version__}")


def _cli_args():
  """The flags this process was started with, when started from fgm_jax.main."""
  if os.path.basename(sys.argv[0]) != "main.py":
    return None
  out, skip = [], False
  for a in sys.argv[1:]:
    if skip or a.startswith("--workdir"):
      skip = a == "--workdir"  # '--workdir DIR': drop DIR too
      continue
    out.append(a)
  return out


def commands(config, workdir):
  """Shell commands reproducing the run (the pipeline, then its stages by hand)."""
  args = _cli_args()
  if args is None:
    return ["# started in-process (not from the command line); equivalent, with this config's "
            "file as <config>:",
            f"python -m fgm_jax.main --config=<config> --config.job=pipeline "
            f"--workdir={workdir}"]
  base = "python -m fgm_jax.main " + " ".join(shlex.quote(a) for a in args
                                             if not a.startswith("--config.job"))
  teacher_dir = os.path.join(workdir, "teacher")
  fgm_dir = os.path.join(workdir, "fgm")
  return [
      "# everything (each stage resumes from its checkpoints):",
      f"{base} --config.job=pipeline --workdir={workdir}",
      "# or the stages one by one (after the teacher stage):",
      f"{base} --config.job=distill --config.teacher.workdir={teacher_dir} --workdir={fgm_dir}",
      f"{base} --config.job=evaluate --config.teacher.workdir={teacher_dir} --workdir={fgm_dir}",
  ]


def _metrics_table(results):
  metrics = results.get("metrics")
  if not metrics:
    return ["No metric for this data here (FID needs Inception-V3 weights); see the samples."]
  names = list(next(iter(metrics.values())).keys())
  rows = ["| samples | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
  order = ["real_data"] + [k for k in metrics if k.startswith("teacher")] + ["fgm_1step"]
  for key in order:
    if key in metrics:
      rows.append(f"| {_label(key)} | "
                  + " | ".join(f"{metrics[key][n]:.4f}" for n in names) + " |")
  return rows


def _metric_note(config):
  data = config.teacher.data
  n = config.eval.num_samples
  if data.name == "digits":
    return (f"Fréchet distance (lower is better) in the feature space of a small CNN trained on "
            f"the digits train split, between {n} samples and the 297 held-out digits. "
            "'real data' is the 1,500 train digits against the same held-out set: roughly the "
            "best a generator can score with this many samples.")
  if data.name == "toy2d":
    return (f"Energy distance and sliced Wasserstein-2 (lower is better) between {n} samples "
            f"and {n} fresh data points; 'real data' is a second fresh draw.")
  return ""


def report_markdown(config, workdir, results, picture, wall, total):
  t, d = config.teacher, config.teacher.data
  detail = d.get("distribution", d.get("tfds_name", None))
  lines = [
      f"# FGM pipeline: {d.name}" + (f" ({detail})" if detail else ""), "",
      f"Date: {time.strftime('%Y-%m-%d %H:%M')}. Machine: {_machine()}.", "",
      f"Teacher: {t.model.name} ({results['model_parameters']:,} parameters, as are the "
      f"generator and the online flow), {t.num_steps} steps of flow matching, batch "
      f"{t.batch_size}, "
      f"lr {t.optim.lr}. FGM: {config.num_steps} iterations, batch {config.batch_size}, "
      f"alpha {config.fgm.alpha}, weighting {config.fgm.weighting}, t* {config.fgm.t_star}, "
      f"generator lr {config.optim.lr} (EMA {config.optim.get('ema_decay', 0.0)}), online lr "
      f"{config.online_optim.lr}. Teacher sampler: {t.sample.method}. All samplers start from "
      f"the same noise (seed {config.eval.seed}).", "",
      _metric_note(config), "",
      *_metrics_table(results), "",
      f"![samples]({picture})", "",
      "## Wall time", "",
      "| stage | seconds |", "|---|---|",
      *[f"| {name} | {sec:.1f} |" for name, sec in wall.items()],
      f"| total | {total:.1f} |", "",
      "## Reproduce", "", "```", *commands(config, workdir), "```", "",
  ]
  return "\n".join(lines)
