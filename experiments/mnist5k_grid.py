"""The MNIST-5k study's picture: held-out digits, the teacher's best samplers and FGM's one
step, every model panel from the same 64 noise draws (the study's evaluation seed).

    python experiments/mnist5k_grid.py [ROOT] [OUT]
        # ROOT defaults to runs/mnist5k, OUT to experiments/results/mnist5k_grids.png

Panels: real held-out, teacher Euler 50 steps, teacher Heun 25 steps (50 evaluations), FGM
default (ROOT/fgm) and FGM alpha = 1.2 (ROOT/fgm_alpha1.2).
"""

import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/
from configs import mnist_fgm  # noqa: E402
from fgm_jax.evaluation import evaluators
from fgm_jax.evaluation import plots
from fgm_jax.train import run_dir
from fgm_jax.train import sampling


def _fgm_config(root, **fgm):
  c = mnist_fgm.get_config()
  c.teacher.workdir = os.path.join(root, "teacher")
  c.eval.classifier_dir = os.path.join(root, "mnist5k_classifier")
  for k, v in fgm.items():
    setattr(c.fgm, k, v)
  return c


def panels(root):
  c = _fgm_config(root)
  n, seed = plots.GRID_IMAGES, c.eval.seed
  trainer, state = run_dir.restore_latest(c, os.path.join(root, "fgm"))
  real = evaluators.build(trainer, c.eval, os.path.join(root, "fgm")).reference_panel()
  euler = trainer.teacher_samples(state, n, seed, 50)
  heun = _heun(trainer, state, n, seed)
  fgm = trainer.samples(state, n, seed, "ema")
  trainer12, state12 = run_dir.restore_latest(_fgm_config(root, alpha=1.2),
                                               os.path.join(root, "fgm_alpha1.2"))
  fgm12 = trainer12.samples(state12, n, seed, "ema")
  return [real,
          sampling.SampleSet("euler50", "teacher Euler 50 steps", euler.x),
          sampling.SampleSet("heun25", "teacher Heun 25 steps", heun.x),
          sampling.SampleSet("fgm", "FGM 1 step (default)", fgm.x),
          sampling.SampleSet("fgm12", "FGM 1 step (alpha 1.2)", fgm12.x)]


def _heun(trainer, state, n, seed):
  sample = trainer.teacher_sample
  method, sample.method = sample.method, "heun"
  try:
    return trainer.teacher_samples(state, n, seed, 25)
  finally:
    sample.method = method


def write_figure(sets, out):
  """The panels side by side (fgm_jax's sample-grid figure), saved at ``out``."""
  with tempfile.TemporaryDirectory() as tmp:
    name = plots.sample_sets_figure(sets, "grid", tmp)
    shutil.copyfile(os.path.join(tmp, name), out)
  print(f"wrote {out}")


def main(argv):
  root = argv[1] if len(argv) > 1 else "runs/mnist5k"
  write_figure(panels(root), argv[2] if len(argv) > 2 else
               "experiments/results/mnist5k_grids.png")


if __name__ == "__main__":
  main(sys.argv)
