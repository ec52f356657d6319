"""FGM on the 8x8 digits: teacher, one-step generator and the digits FD, end to end.

    python -m fgm_jax.main --config=configs/digits_fgm.py --workdir=runs/digits

The default job is 'pipeline': it trains the teacher (configs/digits_teacher.py) into
<workdir>/teacher, distils it into <workdir>/fgm, evaluates teacher Euler 1/4/50-step and FGM
1-step samples (1,500 each, digits-classifier Fréchet distance) and writes
<workdir>/report.md and <workdir>/grids.png. Distillation alone, from a finished teacher:

    python -m fgm_jax.main --config=configs/digits_fgm.py --config.job=train \\
        --config.teacher.workdir=runs/digits/teacher --workdir=runs/digits/fgm

Variants: 'runlocal' (a few steps of each, for smoke tests).
"""

from configs import common
from configs import digits_teacher


def get_config(variant=""):
  words = common.parse_variant(variant, ("runlocal",))
  c = common.base("pipeline", "fgm")
  c.teacher = digits_teacher.get_config(variant)
  c.teacher.workdir = "runs/digits/teacher"  # where the pipeline puts it for --workdir=runs/digits
  c.teacher.use_ema = True
  # Many small generator steps beat fewer large ones at equal compute here; the generator EMA
  # (0.995, ~200-step window) smooths the step-to-step noise of the one-step samples, which
  # is large at this learning rate.
  c.batch_size = 64
  c.num_steps = 1600
  c.fgm = common.fgm()
  # Adam with beta1 = 0 for both networks, as in the FGM/SiD recipes.
  c.optim = common.optim(lr=3e-4, b1=0.0, b2=0.999, ema_decay=0.995)  # generator
  c.online_optim = common.optim(lr=3e-4, b1=0.0, b2=0.999)
  c.checkpoint.every = 400
  c.log.every = 100
  c.log.plot_every = 0
  c.sample.num = 1500
  c.eval = common.evaluation(1500)
  if "runlocal" in words:
    common.runlocal(c, batch_size=16)
  return c
