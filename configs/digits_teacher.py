"""Rectified-flow U-Net teacher on scikit-learn's 8x8 digits (1,500 train images).

    python -m fgm_jax.main --config=configs/digits_teacher.py --workdir=runs/digits/teacher

Sized for a 2-core CPU: the whole digits pipeline (configs/digits_fgm.py) trains this teacher,
distils it and evaluates both in under 15 minutes there.
Variants: 'runlocal' (a few steps, for smoke tests).
"""

from configs import common
from fgm_jax.models import unet


def get_config(variant=""):
  words = common.parse_variant(variant, ("runlocal",))
  c = common.base("train", "teacher")
  # tiny(): 16 channels at 8x8, 32 at 4x4, one block per level, attention at 4x4 (188,769
  # parameters). Wider nets learn more per step but cost 3-10x more per step on a CPU, which
  # this time budget does not allow. No dropout: 1,500 images are seen many times, but the
  # metric compares against held-out digits and the net is too small to memorise them.
  c.model = unet.tiny(dropout=0.0)
  c.data = dict(name="digits", split="train", random_flip=False, shape=(8, 8, 1))
  c.batch_size = 128
  c.num_steps = 2000
  c.flow = common.times()
  c.optim = common.optim(lr=2e-3, warmup_steps=200, grad_clip=1.0, ema_decay=0.995)
  c.checkpoint.every = 1000
  c.log.every = 200
  c.log.plot_every = 0  # the pipeline draws its own grids; set e.g. 1000 for TensorBoard ones
  c.sample.num = 1500
  # 1,500 samples: the same count as the real-data floor (train 1,500 vs held-out 297).
  c.eval = common.evaluation(1500)
  if "runlocal" in words:
    common.runlocal(c, batch_size=16)
  return c
