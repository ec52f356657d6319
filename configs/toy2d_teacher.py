"""Rectified-flow teacher on a toy 2-D distribution.

    python -m fgm_jax.main --config=configs/toy2d_teacher.py:checkerboard --workdir=runs/t

Variants: a distribution name (8gaussians default, checkerboard, moons, 25gaussians);
'quick' for the ~1-minute CPU smoke run used by the quickstart.
"""

from configs import common

DISTRIBUTIONS = ("8gaussians", "checkerboard", "moons", "25gaussians")


def get_config(variant=""):
  words = common.parse_variant(variant, DISTRIBUTIONS + ("quick",))
  c = common.base("train", "teacher")
  c.model = dict(name="mlp", hidden=256, depth=3, time_dim=64)
  dist = [w for w in words if w in DISTRIBUTIONS]
  c.data = dict(name="toy2d", distribution=dist[0] if dist else "8gaussians")
  c.batch_size = 512
  c.num_steps = 20_000
  c.flow = common.times()
  c.optim = common.optim(lr=1e-3, warmup_steps=200, grad_clip=1.0, ema_decay=0.999)
  c.log.plot_every = 5000
  c.eval = common.evaluation(20_000)
  if "quick" in words:
    c.num_steps = 3000
    c.optim.ema_decay = 0.99
    c.log.plot_every = 3000
  return c
