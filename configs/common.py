"""Pieces every config shares, and the variant-string parser.

A variant is the text after ':' in --config=configs/x.py:variant, comma separated, e.g.
``configs/toy2d_fgm.py:checkerboard,quick``.
"""

import ml_collections


def parse_variant(variant, known):
  """Set of variant words; unknown words stop with the list of known ones."""
  words = {w.strip() for w in (variant or "").split(",") if w.strip()}
  unknown = words - set(known)
  if unknown:
    raise ValueError(f"unknown config variant(s) {sorted(unknown)}; known: {sorted(known)}.")
  return words


def optim(lr, b1=0.9, b2=0.999, warmup_steps=0, grad_clip=0.0, ema_decay=0.0):
  return ml_collections.ConfigDict(dict(lr=lr, b1=b1, b2=b2, eps=1e-8, weight_decay=0.0,
                                        warmup_steps=warmup_steps, grad_clip=grad_clip,
                                        ema_decay=ema_decay))


def mesh(data=-1, fsdp=1, tensor=1, rules=()):
  """data=-1 uses every device not taken by fsdp/tensor; rules map logical axis names."""
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor, rules=rules))


def base(job):
  c = ml_collections.ConfigDict()
  c.job = job
  c.seed = 0
  c.mesh = mesh()
  c.checkpoint = ml_collections.ConfigDict(dict(every=1000, keep=3, async_save=True))
  c.log = ml_collections.ConfigDict(dict(every=100, plot_every=0))
  c.sample = ml_collections.ConfigDict(dict(steps=50, method="euler", shift=1.0, num=10000,
                                            seed=1, use_ema=True, output="samples.npz"))
  return c


def fgm(alpha=1.0, weighting="sid_norm", t_star=1.0):
  """FGM loss settings; the defaults are DESIGN.md's (uniform t in [0, 1], one online-flow
  update per generator update)."""
  return dict(alpha=alpha, weighting=weighting, t_star=t_star, t_min=0.0, t_max=1.0,
              time_sampler="uniform", online_steps=1)


def evaluation(num_samples):
  """job=evaluate / pipeline: teacher Euler 1, 4, 50 steps (and FGM 1 step) from seed 123."""
  return dict(num_samples=num_samples, teacher_steps=(1, 4, 50), seed=123, output="eval.json")


def runlocal(c, batch_size, samples=None):
  """Shrinks a config to a 3-step CPU smoke run that still checkpoints and logs each step."""
  c.batch_size = batch_size
  c.num_steps = 3
  c.checkpoint.every = 3
  c.log.every = 1
  c.log.plot_every = 0
  if samples:
    c.sample.num = samples
    c.eval.num_samples = samples
  return c
