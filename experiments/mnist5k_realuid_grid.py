"""The RealUID study's picture (experiments/results/mnist5k_realuid.md): held-out digits, the
teacher's Euler 50 and Heun 25 steps, data-free FGM and FGM with real data at beta/alpha
0.95 and 1.02, every model panel from the same 64 noise draws (the evaluation seed).

    python experiments/mnist5k_realuid_grid.py ROOT [OUT]
        # OUT defaults to experiments/results/mnist5k_realuid_grids.png
"""

import os
import shutil
import sys
import tempfile

from configs import mnist_fgm
from fgm_jax.evaluation import evaluators
from fgm_jax.evaluation import plots
from fgm_jax.train import run_dir
from fgm_jax.train import sampling
from mnist5k_grid import _heun  # (experiments/ is on sys.path when run as a script)

RUNS = (("fgm", "data-free FGM", None),
        ("realuid_a0.92_b0.874_k1_s0", "real data, b/a 0.95", (0.92, 0.874)),
        ("realuid_a0.92_b0.94_k1_s0", "real data, b/a 1.02", (0.92, 0.94)))


def _config(root, real=None):
  c = mnist_fgm.get_config()
  c.teacher.workdir = os.path.join(root, "teacher")
  c.eval.classifier_dir = os.path.join(root, "mnist5k_classifier")
  if real:
    c.fgm.alpha = 0.5
    c.fgm.real_data.update(dict(enabled=True, alpha=real[0], beta=real[1]))
  return c


def panels(root):
  c = _config(root)
  n, seed = plots.GRID_IMAGES, c.eval.seed
  trainer, state = run_dir.restore_latest(c, os.path.join(root, "fgm"))
  out = [evaluators.build(trainer, c.eval, os.path.join(root, "fgm")).reference_panel(),
         sampling.SampleSet("euler50", "teacher Euler 50 steps",
                            trainer.teacher_samples(state, n, seed, 50).x),
         sampling.SampleSet("heun25", "teacher Heun 25 steps", _heun(trainer, state, n, seed).x)]
  for name, label, real in RUNS:
    run_trainer, run_state = run_dir.restore_latest(_config(root, real), os.path.join(root, name))
    out.append(sampling.SampleSet(name, label, run_trainer.samples(run_state, n, seed, "ema").x))
  return out


def main(argv):
  root = argv[1]
  out = argv[2] if len(argv) > 2 else "experiments/results/mnist5k_realuid_grids.png"
  with tempfile.TemporaryDirectory() as tmp:
    name = plots.sample_sets_figure(panels(root), "grid", tmp)
    shutil.copyfile(os.path.join(tmp, name), out)
  print(f"wrote {out}")


if __name__ == "__main__":
  main(sys.argv)
