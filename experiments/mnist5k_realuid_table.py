"""The table of experiments/results/mnist5k_realuid.md from a study root.

    python experiments/mnist5k_realuid_table.py ROOT

Reads ROOT/*/eval_n5000.json (one per distillation), the teacher's
ROOT/teacher/eval_{euler50,heun25}_n5000.json and ROOT/realuid_times.tsv, and prints one row
per variant (seeds side by side, mean ± sample std), then the line "Ratio to teacher:" for
the best variant's mean against the teacher's 50-step Euler FD.
"""

import collections
import json
import os
import re
import sys

import mnist5k_table  # experiments/ is the script's folder, first on sys.path

N = 5000
SEED = re.compile(r"_s(\d+)$")
ITERATIONS = re.compile(r"_it(\d+)$")
COSINE = re.compile(r"_cos(\d+)$")


def _fd(path, key):
  with open(path) as f:
    return json.load(f)[key]["fd"]


def _label(name):
  """Variant label and seed of a run folder (``<run>_it<N>``: that run continued to N
  iterations, its own row; ``<run>_cos<N>``: the same with both learning rates falling to 0
  from iteration 600 to N)."""
  cos = COSINE.search(name)
  if cos:
    label, seed = _label(COSINE.sub("", name))
    return f"{label}, {int(cos.group(1)):,} iterations, lr cosine to 0 from 600", seed
  it = ITERATIONS.search(name)
  if it:
    label, seed = _label(ITERATIONS.sub("", name))
    return f"{label}, {int(it.group(1)):,} iterations", seed
  if name == "fgm":
    return "data-free FGM (alpha 1; the default)", 0
  m = SEED.search(name)
  seed = int(m.group(1)) if m else 0
  base = SEED.sub("", name)
  if base == "fgm":
    return "data-free FGM (alpha 1; the default)", seed
  r = re.match(r"realuid_a([\d.]+)_b([\d.]+)_k(\d+)", base)
  if r:
    a, b, k = float(r.group(1)), float(r.group(2)), int(r.group(3))
    return f"RealUID alpha_r {a}, beta_r {b} (beta/alpha {b / a:.3f}), K = {k}", seed
  return base, seed


def _stats(values):
  mean = sum(values) / len(values)
  if len(values) < 2:
    return mean, float("nan")
  return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def main(root):
  rows = collections.defaultdict(dict)
  times = mnist5k_table.read_times(root, "realuid_times.tsv")
  for name in sorted(os.listdir(root)):
    path = os.path.join(root, name, f"eval_n{N}.json")
    if os.path.exists(path):
      label, seed = _label(name)
      rows[label][seed] = (_fd(path, "fgm_1step"), times.get(name))
  euler = _fd(os.path.join(root, "teacher", f"eval_euler50_n{N}.json"), "teacher_euler_50step")
  heun = _fd(os.path.join(root, "teacher", f"eval_heun25_n{N}.json"), "teacher_heun_25step")
  print(f"| sampler | FD per seed (N = {N:,}) | mean ± std | wall time per run (s) |")
  print("|---|---|---|---|")
  print(f"| teacher, Euler 50 steps | {euler:.2f} | | |")
  print(f"| teacher, Heun 25 steps (50 evaluations) | {heun:.2f} | | |")
  best = None
  for label, by_seed in rows.items():
    fds = [by_seed[s][0] for s in sorted(by_seed)]
    secs = [str(by_seed[s][1]) if by_seed[s][1] else "-" for s in sorted(by_seed)]
    mean, std = _stats(fds)
    spread = "" if std != std else f" ± {std:.2f}"
    print(f"| {label} | {' / '.join(f'{v:.2f}' for v in fds)} | {mean:.2f}{spread} | "
          f"{', '.join(secs)} |")
    if "RealUID" in label and len(fds) >= 2 and (best is None or mean < best[1]):
      best = (label, mean)
  print()
  if best:
    print(f"Ratio to teacher: {best[1] / euler:.3f} (best real-data variant, mean of >= 2 "
          f"seeds, {best[0]}: {best[1]:.2f} against the teacher's 50-step Euler {euler:.2f}; "
          f"Heun 25: {heun:.2f})")


if __name__ == "__main__":
  main(sys.argv[1])
