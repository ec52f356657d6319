"""The RealUID study's picture (experiments/results/mnist5k_realuid.md): held-out digits, the
teacher's Euler 50 and Heun 25 steps, data-free FGM and FGM with real data at beta/alpha
1.00 and 0.98 (seed 0, 1,800 iterations, learning rates falling from 600: the cos_* runs),
every model panel from the same 64 noise draws (the evaluation seed).

    python experiments/mnist5k_realuid_grid.py ROOT [OUT]
        # OUT defaults to experiments/results/mnist5k_realuid_grids.png
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/
from configs import mnist_fgm  # noqa: E402
from fgm_jax.evaluation import evaluators
from fgm_jax.evaluation import plots
from fgm_jax.train import run_dir
from fgm_jax.train import sampling
import mnist5k_grid  # (experiments/ is on sys.path when run as a script)

RUNS = (("fgm_cos1800", "data-free FGM", None),
        ("realuid_a0.92_b0.92_k1_s0_cos1800", "real data, b/a 1.00", (0.92, 0.92)),
        ("realuid_a0.92_b0.9016_k1_s0_cos1800", "real data, b/a 0.98", (0.92, 0.9016)))


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
         sampling.SampleSet("heun25", "teacher Heun 25 steps", mnist5k_grid._heun(trainer, state, n, seed).x)]
  for name, label, real in RUNS:
    run_trainer, run_state = run_dir.restore_latest(_config(root, real), os.path.join(root, name))
    out.append(sampling.SampleSet(name, label, run_trainer.samples(run_state, n, seed, "ema").x))
  return out


def main(argv):
  mnist5k_grid.write_figure(panels(argv[1]), argv[2] if len(argv) > 2 else
                            "experiments/results/mnist5k_realuid_grids.png")


if __name__ == "__main__":
  main(sys.argv)
