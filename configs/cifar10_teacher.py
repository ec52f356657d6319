"""Rectified-flow DDPM++ teacher on CIFAR-10 (32x32x3, unconditional), from tfds.

    python -m fgm_jax.main --config=configs/cifar10_teacher.py --workdir=runs/cifar10_teacher

Needs CIFAR-10 prepared for tfds (nothing is downloaded implicitly): pass
--config.data.data_dir=<folder holding cifar10/> or --config.data.manual_dir=<folder holding
cifar-10-python.tar.gz>; a run without it stops with instructions.
Variants: 'runlocal' (tiny U-Net, batch 8, 3 steps: a CPU smoke run of the same pipeline).

Provenance of the values: [EDM] Karras et al. 2022 DDPM++ CIFAR-10; [score_sde] Song et al.
2021's DDPM++ CIFAR-10 recipe, which 1-Rectified Flow (the FGM paper's CIFAR-10 teacher) trains
with; [ours] our choice.
"""

import ml_collections

from configs import common
from fgm_jax.models import unet


def data_config():
  return ml_collections.ConfigDict(dict(
      name="tfds", tfds_name="cifar10", split="train",
      random_flip=True,  # [EDM, score_sde] CIFAR-10 is left-right symmetric
      shape=(32, 32, 3),
      # Where tfds finds the prepared dataset (None: ~/tensorflow_datasets or $TFDS_DATA_DIR),
      # or a folder with the source archive to prepare it from. Placeholders so that
      # --config.data.data_dir=... works on the command line.
      data_dir=ml_collections.config_dict.placeholder(str),
      manual_dir=ml_collections.config_dict.placeholder(str)))


def get_config(variant=""):
  words = common.parse_variant(variant, ("runlocal",))
  c = common.base("teacher")
  # DDPM++ [EDM] (55.7 M parameters): 128 channels, mult (2, 2, 2), 4 blocks, attention at
  # 16x16, dropout 0.13 [EDM]. augment_dim=0 [ours]: EDM's 9-dim input carries the labels of
  # its non-leaking augmentation pipeline, which we do not run, so it would always be zero; set
  # augment_dim=9 only to load EDM weights. Dropout acts in teacher training only: FGM applies
  # all three networks in inference mode.
  c.model = unet.ddpmpp_cifar10(augment_dim=0)
  c.data = data_config()
  c.batch_size = 128  # [score_sde]
  c.num_steps = 800_000  # [ours] (score_sde trains 1.3 M iterations)
  c.flow = common.times()  # rectified flow's uniform t on [0, 1]
  # Adam lr 2e-4, 5,000 warm-up steps, clipping at 1, EMA 0.9999 [score_sde].
  c.optim = common.optim(lr=2e-4, b1=0.9, b2=0.999, warmup_steps=5000, grad_clip=1.0,
                         ema_decay=0.9999)
  c.checkpoint.every = 10_000  # [ours]
  c.log.every = 100
  c.log.plot_every = 10_000
  c.sample.steps = 50  # [ours] Euler; the paper reports the teacher with an adaptive solver
  c.sample.num = 50_000  # the FID convention
  c.eval = common.evaluation(50_000)
  c.eval.fid = common.fid()  # FID-50k, the convention of every CIFAR-10 result
  if "runlocal" in words:
    # A one-level tiny U-Net (16 channels, attention at 32x32): compiles in a third of the
    # time of a two-level one on a CPU, and the run only has to show the pipeline works.
    c.model = unet.tiny(channel_mult=(1,), attn_resolutions=(32,))
    common.runlocal(c, batch_size=8, samples=16)
    c.optim.warmup_steps = 0
  return c
