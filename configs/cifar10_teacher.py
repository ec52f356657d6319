"""Rectified-flow DDPM++ teacher on CIFAR-10 (32x32x3, unconditional), from tfds.

    python -m fgm_jax.main --config=configs/cifar10_teacher.py --workdir=runs/cifar10_teacher

Needs CIFAR-10 prepared for tfds (nothing is downloaded implicitly): pass
--config.data.data_dir=<folder holding cifar10/> or --config.data.manual_dir=<folder holding
cifar-10-python.tar.gz>; a run without it stops with instructions.
Variants: 'runlocal' (tiny U-Net, batch 8, 3 steps: a CPU smoke run of the same pipeline);
'rf_teacher': the published 1-Rectified-Flow CIFAR-10 teacher (gnobitab/RectifiedFlow), the
config its imported checkpoint runs under:

    python -m fgm_jax.convert.rectified_flow checkpoint_8.pth runs/cifar10_rf_teacher
    python -m fgm_jax.main --config=configs/cifar10_teacher.py:rf_teacher --config.job=sample \
        --workdir=runs/cifar10_rf_teacher

'rf_teacher,runlocal' is its narrow CPU-test network (one level, 16 channels).

Provenance of the values: [EDM] Karras et al. 2022 DDPM++ CIFAR-10; [score_sde] Song et al.
2021's DDPM++ CIFAR-10 recipe, which 1-Rectified Flow (the FGM paper's CIFAR-10 teacher) trains
with; [RF] RectifiedFlow's configs/rectified_flow/cifar10_rf_gaussian_ddpmpp.py and its
training code (Liu et al. 2022); [ours] our choice.
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
      manual_dir=ml_collections.config_dict.placeholder(str),
      # The tfds features holding the images and (conditional runs) the labels.
      image_key="image", label_key=ml_collections.config_dict.placeholder(str)))


def get_config(variant=""):
  words = common.parse_variant(variant, ("runlocal", "rf_teacher"))
  c = common.base("train", "teacher")
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
  if "rf_teacher" in words:
    rf_teacher(c)
  if "runlocal" in words and "rf_teacher" in words:
    # A one-level RF network, 16 channels (tests/rf_reference.RUNLOCAL): FGM on it compiles
    # 3x faster than on a two-level one (37 s vs 115 s for 3 iterations on 2 loaded cores),
    # and the import path is the same. The converter's numerics test covers two levels.
    c.model = rf_narrow_model()
    common.runlocal(c, batch_size=8, samples=16)
    c.optim.warmup_steps = 0
  elif "runlocal" in words:
    # A one-level tiny U-Net (16 channels, attention at 32x32): compiles in a third of the
    # time of a two-level one on a CPU, and the run only has to show the pipeline works.
    c.model = unet.tiny(channel_mult=(1,), attn_resolutions=(32,))
    common.runlocal(c, batch_size=8, samples=16)
    c.optim.warmup_steps = 0
  return c


def rf_narrow_model():
  """The ':rf_teacher,runlocal' network: the RF layout at nf=16, one level, one block, attention
  only in the middle block."""
  return unet.rectified_flow_cifar10(model_channels=16, channel_mult=(1,), num_blocks=1,
                                     attn_resolutions=())


def rf_teacher(c):
  """The 1-Rectified-Flow CIFAR-10 teacher's settings, in our conventions."""
  # score_sde DDPM++ with BigGAN blocks [RF]: nf 128, ch_mult (1, 2, 2, 2), 4 blocks, attention
  # at 16x16, dropout 0.15, positional time embedding, 61,804,419 parameters. The network sees
  # label 999 s with s = 1 - t and predicts data - noise, so v(x, t) = -u(x, 999 (1 - t))
  # (unet.rectified_flow_cifar10's time_scale / time_reverse / output_scale) [RF].
  c.model = unet.rectified_flow_cifar10()
  # Data centred to [-1, 1] with left-right flips [RF]: what our tfds pipeline does (above).
  c.batch_size = 128  # [RF]
  c.num_steps = 800_000  # [RF] the published checkpoint_8.pth (their config runs 1.3 M)
  # Their loss draws s ~ U[1e-3, 1): our t = 1 - s stays in [0, 0.999] [RF].
  c.flow = common.times(t_max=0.999)
  # Adam lr 2e-4, eps 1e-8, 5,000 warm-up steps, clipping at 1, EMA 0.999999 [RF]. (Their EMA
  # also warms up its decay, min(decay, (1 + n) / (10 + n)); ours does not [ours].)
  c.optim = common.optim(lr=2e-4, b1=0.9, b2=0.999, warmup_steps=5000, grad_clip=1.0,
                         ema_decay=0.999999)
  # Sampling: Euler with config.sample.steps from t = 1 [ours]; RectifiedFlow reports FID 2.58
  # with RK45 (tolerance 1e-5) integrating s over [1e-3, 1], i.e. our t from 0.999 to 0.
  return c
