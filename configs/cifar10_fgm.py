"""FGM distillation of the CIFAR-10 rectified-flow teacher into a one-step generator.

    python -m fgm_jax.main --config=configs/cifar10_fgm.py --workdir=runs/cifar10_fgm \\
        --config.teacher.workdir=runs/cifar10_teacher

The teacher's whole config (configs/cifar10_teacher.py) is nested under config.teacher; its
model is the architecture of all three networks, and config.teacher.workdir names the finished
teacher run to restore (train it first; that needs CIFAR-10 prepared for tfds). FGM itself
needs no data.
Variants: 'runlocal' (tiny U-Net, batch 8, 3 iterations, for a CPU smoke run);
'rf_teacher': distil the published 1-Rectified-Flow CIFAR-10 teacher (gnobitab/RectifiedFlow,
the FGM paper's CIFAR-10 teacher), imported with fgm_jax.convert.rectified_flow:

    python -m fgm_jax.convert.rectified_flow checkpoint_8.pth runs/cifar10_rf_teacher
    python -m fgm_jax.main --config=configs/cifar10_fgm.py:rf_teacher \\
        --config.teacher.workdir=runs/cifar10_rf_teacher --workdir=runs/cifar10_rf_fgm

'rf_teacher,runlocal' distils the narrow RF network a test checkpoint converts into
(tests/rf_reference.write_random_checkpoint(path, **rf_reference.RUNLOCAL)).
'realuid': RealUID's CIFAR-10 recipe (real-data supervision, config.fgm.real_data; tfds
CIFAR-10, the teacher's data, is the real stream); combines with 'rf_teacher' and 'runlocal':

    python -m fgm_jax.main --config=configs/cifar10_fgm.py:rf_teacher,realuid \
        --config.teacher.workdir=runs/cifar10_rf_teacher --workdir=runs/cifar10_rf_realuid

Provenance of the values: [FGM] Huang et al. 2024 (Flow Generator Matching), CIFAR-10
unconditional; [RF] RectifiedFlow (Liu et al. 2022) and its code; [RealUID] Kornilov et al.
2026 (arXiv 2509.22459) and their code, unconditional CIFAR-10; [ours] our choice, where the
paper gives no value we know of.
"""

from configs import common
from configs import cifar10_teacher


def get_config(variant=""):
  words = common.parse_variant(variant, ("runlocal", "rf_teacher", "realuid"))
  c = common.base("train", "fgm")
  c.teacher = cifar10_teacher.get_config(",".join(w for w in words if w != "realuid"))
  c.teacher.workdir = "runs/cifar10_teacher"
  c.teacher.use_ema = True  # [ours] distil the teacher's EMA weights
  c.batch_size = 256  # [FGM]
  c.num_steps = 200_000  # [ours]
  # alpha = 1: the generator loss the paper trains with in practice (DESIGN.md §2) [FGM];
  # weighting, t*, t range and 1:1 update ratio [ours] (DESIGN.md defaults).
  c.fgm = common.fgm()
  # Adam beta1 = 0, beta2 = 0.999, lr 1e-5 for both networks, with a generator EMA [FGM];
  # the EMA decay 0.9999 [ours].
  c.optim = common.optim(lr=1e-5, b1=0.0, b2=0.999, ema_decay=0.9999)  # generator
  c.online_optim = common.optim(lr=1e-5, b1=0.0, b2=0.999)  # online flow
  c.checkpoint.every = 5_000  # [ours]
  c.log.every = 100
  c.log.plot_every = 5_000
  c.sample.num = 50_000
  c.eval = common.evaluation(50_000)
  c.eval.fid = common.fid()  # FID-50k, the convention of every CIFAR-10 result
  if "rf_teacher" in words:
    c.teacher.workdir = "runs/cifar10_rf_teacher"  # [ours] the converter's OUT_WORKDIR
    # RectifiedFlow never trained at s < 1e-3 (our t > 0.999) [RF], so the FGM times stay in
    # [0, 0.999] and the generator reads its noise at t* = 0.999 [ours], where the teacher's
    # first Euler step starts in RectifiedFlow's own sampler [RF].
    c.fgm = dict(common.fgm(t_star=0.999), t_max=0.999)
  if "realuid" in words:
    realuid(c)
  if "runlocal" in words:
    common.runlocal(c, batch_size=8, samples=16)
    c.optim.lr = c.online_optim.lr = 1e-4
  return c


def realuid(c):
  """RealUID's unconditional CIFAR-10 recipe on our U-Net (their about 500k updates; the
  optional fine-tuning stage is a second run, README 'Real data')."""
  c.fgm.alpha = 0.5  # the generator loss's 1/2 form, the only one their theory covers
  c.fgm.real_data = common.real_data(enabled=True, alpha=0.92, beta=0.94)  # [RealUID] headline
  c.fgm.online_steps = 5  # [RealUID] fewer than 3 was unstable with their U-Net
  c.fgm.init_online = "random"  # [RealUID] online flow randomly initialised
  c.fgm.weighting = "uniform"  # [RealUID] t uniform on [0, 1], no per-time weighting
  c.batch_size = 256  # [RealUID] 256 generated + 256 real (per online update here)
  c.num_steps = 500_000  # [RealUID]
  # Adam (0, 0.999), lr 3e-5, 500-step warm-up, gradient-norm clip 1 for both nets; generator
  # EMA 0.999, with 0.9996 and 0.9999 tracked beside it (weights 'ema_0.9996', 'ema_0.9999')
  # to report the best [RealUID].
  c.optim = common.optim(lr=3e-5, b1=0.0, b2=0.999, warmup_steps=500, grad_clip=1.0,
                         ema_decay=0.999, extra_ema_decays=(0.9996, 0.9999))
  c.online_optim = common.optim(lr=3e-5, b1=0.0, b2=0.999, warmup_steps=500, grad_clip=1.0)
