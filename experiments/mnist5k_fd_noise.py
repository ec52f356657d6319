"""The MNIST-5k FD's noise: the same sampler scored on fresh noise seeds, and real-data draws.

    python experiments/mnist5k_fd_noise.py --config=configs/mnist_fgm.py \\
        --config.teacher.workdir=runs/mnist5k/teacher --workdir=runs/mnist5k/fgm \\
        --num=1000 --seeds=5 [--teacher_steps=50]

Restores the run in --workdir (a distill run: the FGM generator's one-step samples; with
--teacher_steps=N, or for a teacher run, the teacher's Euler N-step samples), draws --num
samples from each of --seeds noise seeds and prints the FDs, their mean and standard deviation,
then the same for --seeds sets of --num real train images. Differences between study rows
smaller than about twice the sampler's standard deviation are not resolved.
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

# The config files import configs/ (the repo root), which `python experiments/...` does not put
# on sys.path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fgm_jax import config_checks
from fgm_jax.evaluation import feature_classifier as fc
from fgm_jax.evaluation import mnist5k_evaluator as me
from fgm_jax.evaluation import evaluators
from fgm_jax.train import run_dir

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run to sample (teacher or distill).")
_NUM = flags.DEFINE_integer("num", 1000, "Samples per draw (the study's config.eval.num_samples).")
_SEEDS = flags.DEFINE_integer("seeds", 5, "Draws, from noise seeds 1000, 1001, ...")
_TEACHER_STEPS = flags.DEFINE_integer(
    "teacher_steps", 0, "Score the teacher's Euler samples with this many steps (0: the FGM "
    "generator for a distill run, config.sample.steps for a teacher run).")


def main(argv):
  del argv
  config, workdir = _CONFIG.value, _WORKDIR.value
  config_checks.validate(config)
  trainer, state = run_dir.restore_latest(config, workdir)
  cache_dir = evaluators.build(trainer, config.eval, workdir).classifier_dir
  steps = _TEACHER_STEPS.value
  if config_checks.is_fgm(config) and not steps:
    draw, what = (lambda seed: trainer.samples(state, _NUM.value, seed).x), "FGM 1-step"
  else:
    steps = steps or config.sample.steps
    draw = lambda seed: trainer.teacher_samples(state, _NUM.value, seed, steps).x
    what = f"teacher Euler {steps}-step"
  seeds = range(1000, 1000 + _SEEDS.value)
  start = time.time()
  out = {"sampler": fc.fd_spread(me.SPEC, cache_dir,
                                 lambda seed: me.to_classifier_input(draw(seed)), seeds),
         "real": me.real_fd_noise(cache_dir, _NUM.value, draws=_SEEDS.value)}
  for name, label in (("sampler", what), ("real", "real train images")):
    r = out[name]
    print(f"{label}, N={_NUM.value}, {len(r['fds'])} draws: FD {r['mean']:.3f} +- "
          f"{r['std']:.3f} (std); draws {', '.join(f'{v:.3f}' for v in r['fds'])}")
  print(json.dumps({"what": what, "num": _NUM.value, "wall_s": time.time() - start, **out}))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
