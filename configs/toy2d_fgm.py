"""FGM distillation of the toy 2-D teacher into a one-step generator.

    python -m fgm_jax.main --config=configs/toy2d_fgm.py:checkerboard --workdir=runs/fgm \\
        --config.teacher.workdir=runs/t

The teacher's whole config is nested under config.teacher (its model is the architecture of
all three networks); config.teacher.workdir names the teacher run to restore.
Variants: as configs/toy2d_teacher.py.
"""

from configs import common
from configs import toy2d_teacher


def get_config(variant=""):
  words = common.parse_variant(variant, toy2d_teacher.DISTRIBUTIONS + ("quick",))
  c = common.base("train", "fgm")
  c.teacher = toy2d_teacher.get_config(variant)
  c.teacher.workdir = "runs/toy2d_teacher_" + c.teacher.data.distribution
  c.teacher.use_ema = True
  c.batch_size = 512
  c.num_steps = 16_000
  c.fgm = common.fgm()
  # Adam with beta1 = 0 for both networks, as in the FGM/SiD recipes.
  c.optim = common.optim(lr=1e-4, b1=0.0, b2=0.999, ema_decay=0.999)  # generator
  c.online_optim = common.optim(lr=1e-4, b1=0.0, b2=0.999)
  c.log.plot_every = 4000
  c.eval = common.evaluation(20_000)
  if "quick" in words:
    c.num_steps = 2000
    c.optim.ema_decay = 0.99
    c.log.plot_every = 2000
    c.eval.num_samples = 5000  # energy distance is O(n^2): 20k samples cost ~70 s on 2 cores
  return c
