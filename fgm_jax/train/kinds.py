"""The kinds of training run, declared by ``config.trainer`` and resolved by name.

Each name maps to a ``trainers.TrainerKind`` ("module:attribute", imported on use), so
``train/`` never imports the SD3 package: the SD3 kind lives in ``fgm_jax/sd3/distill.py`` and
is only named here. A new kind (a new teacher source, a new method) is one entry here and one
``TrainerKind`` beside its trainer.
"""

from fgm_jax import registry

KINDS = {
    "teacher": "fgm_jax.train.trainers:TEACHER",  # flow matching on config.data
    "fgm": "fgm_jax.train.trainers:FGM",  # FGM from a teacher run's checkpoint
    "sd3_fgm": "fgm_jax.sd3.distill:KIND",  # FGM of an SD3 diffusers folder's MM-DiT
}
# Kinds whose config nests the teacher (config.teacher) and the FGM settings (config.fgm).
DISTILL_KINDS = ("fgm", "sd3_fgm")


def resolve(name: str):
  """The TrainerKind registered under ``name`` (config.trainer)."""
  return registry.resolve(KINDS, name, "config.trainer")
