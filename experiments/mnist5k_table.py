"""The MNIST-5k study's table (experiments/results/mnist5k.md) from its runs' eval.json files.

    python experiments/mnist5k_table.py [ROOT]      # ROOT defaults to runs/mnist5k

Reads what experiments/mnist5k_study.sh wrote: ROOT/eval.json (teacher Euler rows, real-data
floor, FGM seed 0), ROOT/teacher/eval_heun.json, ROOT/fgm_<variant>[_seed<k>]/eval.json and
ROOT/fgm*/eval_n5000.json (the FGM runs on 5,000 samples) and ROOT/study_times.tsv; prints
markdown. Variants with several seeds show each seed and the mean.
"""

import json
import os
import statistics
import sys

N_LARGE = 5000  # the FGM runs' second scoring (experiments/mnist5k_study.sh)

# (row label, run folders: seed 0 first). 'fgm' is the pipeline's own FGM run.
VARIANTS = (
    ("FGM 1 step, default (alpha 1, t* 1, 1 online step, both from the teacher)",
     ("fgm", "fgm_seed1", "fgm_seed2")),
    ("alpha = 0.5", ("fgm_alpha0.5", "fgm_alpha0.5_seed1")),
    ("alpha = 1.2", ("fgm_alpha1.2", "fgm_alpha1.2_seed1")),
    ("t* = 0.8", ("fgm_tstar0.8", "fgm_tstar0.8_seed1")),
    ("t* = 0.6", ("fgm_tstar0.6", "fgm_tstar0.6_seed1")),
    ("2 online updates per generator update (equal compute)",
     ("fgm_online2", "fgm_online2_seed1")),
    ("online flow from random init", ("fgm_online_random", "fgm_online_random_seed1")),
    ("generator from random init", ("fgm_generator_random", "fgm_generator_random_seed1")),
)


def _metrics(path):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    data = json.load(f)
  return data.get("metrics", data)  # the pipeline nests them; job=evaluate does not


def read_times(root, name="study_times.tsv"):
  """{run: seconds} from a study's "NAME<TAB>seconds" lines (a run stopped and resumed has
  one line per attempt: summed)."""
  out = {}
  path = os.path.join(root, name)
  if os.path.exists(path):
    for line in open(path):
      name, seconds = line.split("\t")
      out[name] = out.get(name, 0) + int(seconds)
  return out


def _pipeline_distill_seconds(root):
  with open(os.path.join(root, "eval.json")) as f:
    stages = json.load(f)["wall_time_s"]
    return round(stages.get("fgm", stages.get("distill")))  # "distill" before 2026-12-07


def teacher_rows(root):
  rows = []
  euler = _metrics(os.path.join(root, "eval.json")) or {}
  heun = _metrics(os.path.join(root, "teacher", "eval_heun.json")) or {}
  if "real_data" in euler:
    rows.append(("real data (1,000 train images vs held-out)", 0, euler["real_data"]["fd"]))
  for sampler, table, evals_per_step in (("euler", euler, 1), ("heun", heun, 2)):
    steps = sorted(int(k.split("_")[-1][:-4]) for k in table
                   if k.startswith(f"teacher_{sampler}_"))
    for n in steps:
      rows.append((f"teacher, {sampler.capitalize()} {n} step{'s' * (n > 1)}",
                   n * evals_per_step, table[f"teacher_{sampler}_{n}step"]["fd"]))
  return rows


def fgm_rows(root):
  """(label, FDs at N = 1,000, FDs at N_LARGE, distill seconds) per variant, seeds in order."""
  times = read_times(root)
  rows = []
  for label, runs in VARIANTS:
    fds, large, secs = [], [], []
    for run in runs:
      # The pipeline's own FGM run is scored in ROOT/eval.json with the teacher rows.
      m = _metrics(os.path.join(root, "eval.json") if run == "fgm" else
                   os.path.join(root, run, "eval.json"))
      if m is None:
        continue
      fds.append(m["fgm_1step"]["fd"])
      m_large = _metrics(os.path.join(root, run, f"eval_n{N_LARGE}.json"))
      large.append(None if m_large is None else m_large["fgm_1step"]["fd"])
      secs.append(times.get(run, _pipeline_distill_seconds(root) if run == "fgm" else None))
    if fds:
      rows.append((label, fds, large, secs))
  return rows


def _seeds(values):
  """'a / b / c' and 'mean ± std' of the values that exist."""
  there = [v for v in values if v is not None]
  if not there:
    return "-", "-"
  spread = f" ± {statistics.stdev(there):.1f}" if len(there) > 1 else ""
  return " / ".join(f"{x:.2f}" for x in there), f"{statistics.mean(there):.2f}{spread}"


def markdown(root):
  lines = ["| sampler | network evaluations | FD |", "|---|---|---|"]
  for label, evals, fd in teacher_rows(root):
    lines.append(f"| {label} | {evals or '-'} | {fd:.2f} |")
  lines += ["", f"| FGM one step | FD per seed (0, 1, 2), N = 1,000 | mean | "
            f"FD per seed, N = {N_LARGE:,} | mean | distill wall time (s) |",
            "|---|---|---|---|---|---|"]
  for label, fds, large, secs in fgm_rows(root):
    wall = ", ".join("-" if s is None else str(s) for s in secs)
    lines.append(f"| {label} | {' | '.join(_seeds(fds))} | {' | '.join(_seeds(large))} | "
                 f"{wall} |")
  return "\n".join(lines)


def wall_markdown(root):
  """Seconds per run: the pipeline's stages, then each study run as study_times.tsv has it."""
  with open(os.path.join(root, "eval.json")) as f:
    stages = json.load(f)["wall_time_s"]
  lines = ["| run | seconds |", "|---|---|"]
  lines += [f"| pipeline: {k} | {v:.0f} |" for k, v in stages.items()]
  total = sum(stages.values())
  for name, seconds in read_times(root).items():
    if name != "pipeline":
      lines.append(f"| {name} | {seconds} |")
      total += seconds
  lines.append(f"| **total** | **{total:.0f} ({total / 60:.0f} min)** |")
  return "\n".join(lines)


if __name__ == "__main__":
  root = sys.argv[1] if len(sys.argv) > 1 else "runs/mnist5k"
  print(markdown(root) + "\n\n" + wall_markdown(root))
