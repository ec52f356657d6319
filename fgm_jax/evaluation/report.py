"""The pipeline's report.md: metrics table, run settings, wall time, commands to reproduce."""

import os
import platform
import shlex
import sys
import time

import jax

REAL_DATA = ("real_data", "real data")  # metrics key and label of the real-data floor


def machine() -> str:
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


def commands(workdir):
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
      f"{base} --config.job=train --config.teacher.workdir={teacher_dir} --workdir={fgm_dir}",
      f"{base} --config.job=evaluate --config.teacher.workdir={teacher_dir} --workdir={fgm_dir}",
  ]


def rows(metrics, sets):
  """(label, metrics) in reading order: the real-data floor, then the sample sets."""
  out = [(REAL_DATA[1], metrics[REAL_DATA[0]])] if REAL_DATA[0] in metrics else []
  return out + [(s.label, metrics[s.key]) for s in sets if s.key in metrics]


def summary(metrics, sets) -> str:
  """One line: 'real data fd 5.27; teacher 1-step euler fd 986.2; ...'."""
  if not metrics:
    return "no metric"
  return "; ".join(f"{label} " + ", ".join(f"{k} {v:.4g}" for k, v in m.items())
                   for label, m in rows(metrics, sets))


def metrics_table(metrics, sets):
  if not metrics:
    return ["No metric for this data here (FID needs Inception-V3 weights); see the samples."]
  names = list(next(iter(metrics.values())).keys())
  lines = ["| samples | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
  for label, m in rows(metrics, sets):
    lines.append(f"| {label} | " + " | ".join(f"{m[n]:.4f}" for n in names) + " |")
  return lines


def markdown(config, workdir, results, sets, evaluator, picture, wall, total):
  """The whole report.md of a pipeline run; ``evaluator`` names the data and the metric."""
  t = config.teacher
  lines = [
      f"# FGM pipeline: {evaluator.title()}", "",
      f"Date: {time.strftime('%Y-%m-%d %H:%M')}. Machine: {machine()}.", "",
      f"Teacher: {t.model.name} ({results['model_parameters']:,} parameters, as are the "
      f"generator and the online flow), {t.num_steps} steps of flow matching, batch "
      f"{t.batch_size}, "
      f"lr {t.optim.lr}. FGM: {config.num_steps} iterations, batch {config.batch_size}, "
      f"alpha {config.fgm.alpha}, weighting {config.fgm.weighting}, t* {config.fgm.t_star}, "
      f"generator lr {config.optim.lr} (EMA {config.optim.ema_decay}), online lr "
      f"{config.online_optim.lr}. Teacher sampler: {t.sample.method}. All samplers start from "
      f"the same noise (seed {config.eval.seed}).", "",
      evaluator.note(config.eval.num_samples), "",
      *metrics_table(results.get("metrics"), sets), "",
      f"![samples]({picture})", "",
      "## Wall time", "",
      "| stage | seconds |", "|---|---|",
      *[f"| {name} | {sec:.1f} |" for name, sec in wall.items()],
      f"| total | {total:.1f} |", "",
      "## Reproduce", "", "```", *commands(workdir), "```", "",
  ]
  return "\n".join(lines)
