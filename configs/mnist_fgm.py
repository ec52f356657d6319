"""FGM on MNIST-5k: teacher, one-step generator and the MNIST-5k FD, end to end.

    python -m fgm_jax.main --config=configs/mnist_fgm.py --workdir=runs/mnist5k

The default job is 'pipeline': it trains the teacher (configs/mnist_teacher.py) into
<workdir>/teacher, distils it into <workdir>/fgm, evaluates teacher Euler 1/2/4/8/16/50-step and
FGM 1-step samples (1,000 each, same noise; FD in a small MNIST classifier's features against
the 500 held-out digits, fgm_jax/evaluation/mnist5k_evaluator.py) and writes
<workdir>/report.md and <workdir>/grids.png. Distillation alone, from a finished teacher (e.g.
an ablation: --config.fgm.alpha=0.5, --config.fgm.t_star=0.8, --config.fgm.online_steps=2):

    python -m fgm_jax.main --config=configs/mnist_fgm.py --config.job=train \\
        --config.teacher.workdir=runs/mnist5k/teacher --workdir=runs/mnist5k/fgm_alpha0.5

and scored with --config.job=evaluate on the same flags.
Variants: 'runlocal' (a few steps of each on a one-level U-Net, for smoke tests);
'realuid', the RealUID study's best real-data recipe (experiments/results/mnist5k_realuid.md:
real data at alpha_r = beta_r = 0.92 with the generator loss's 1/2 form, 1,800 iterations,
both learning rates falling on a cosine from iteration 600; FD 34.95, 0.76 x the teacher's
Euler 50, level with data-free FGM on the same schedule):

    python -m fgm_jax.main --config=configs/mnist_fgm.py:realuid --config.job=train \\
        --config.teacher.workdir=runs/mnist5k/teacher --workdir=runs/mnist5k/realuid
"""

from configs import common
from configs import mnist_teacher


def get_config(variant=""):
  words = common.parse_variant(variant, ("runlocal", "realuid"))
  c = common.base("pipeline", "fgm")
  c.teacher = mnist_teacher.get_config(",".join(sorted(words & {"runlocal"})))
  c.teacher.workdir = "runs/mnist5k/teacher"  # where the pipeline puts it for --workdir=runs/mnist5k
  c.teacher.use_ema = True
  # The digits recipe (configs/digits_fgm.py) at a smaller batch: an FGM iteration costs
  # about four teacher steps (three networks, two updates), and many small generator steps
  # with a generator EMA beat fewer large ones there at equal compute.
  c.batch_size = 16
  c.num_steps = 600
  c.fgm = common.fgm()  # alpha 1, sid_norm weighting, t* = 1, one online step per generator step
  # Adam with beta1 = 0 for both networks, as in the FGM/SiD recipes.
  c.optim = common.optim(lr=3e-4, b1=0.0, b2=0.999, ema_decay=0.99)  # generator
  c.online_optim = common.optim(lr=3e-4, b1=0.0, b2=0.999)
  c.checkpoint.every = 200
  c.log.every = 50
  c.log.plot_every = 0
  c.sample.num = 1000
  c.eval = common.evaluation(c.teacher.eval.num_samples)
  c.eval.teacher_steps = c.teacher.eval.teacher_steps  # Euler 1, 2, 4, 8, 16, 50
  if "realuid" in words:
    c.num_steps = 1800
    c.optim.decay_steps = c.online_optim.decay_steps = (600, 1800)
    c.fgm.alpha = 0.5  # RealUID's generator loss is the 1/2 form
    c.fgm.real_data.update(dict(enabled=True, alpha=0.92, beta=0.92))
  if "runlocal" in words:
    common.runlocal(c, batch_size=8, samples=64)
  return c
