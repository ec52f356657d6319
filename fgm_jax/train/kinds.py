"""The kinds of training run, declared by ``config.trainer`` and resolved by name.

Each name maps to a ``trainers.TrainerKind`` ("module:attribute", imported on use), so
``train/`` never imports the SD3 package: the SD3 kind lives in ``fgm_jax/sd3/trainer.py`` and
is only named here. A new kind (a new teacher source, a new method) is one entry here and one
``TrainerKind`` beside its trainer.
"""

from fgm_jax import registry

KINDS = {
    "teacher": "fgm_jax.train.trainers:TEACHER",  # flow matching on config.data
    "fgm": "fgm_jax.train.trainers:FGM",  # FGM from a teacher run's checkpoint
    "sd3_fgm": "fgm_jax.sd3.trainer:KIND",  # FGM of an SD3 diffusers folder's MM-DiT
    "sd3_folder": None,  # trains nothing: samples an SD3 folder, caches prompt embeddings
}
# Kinds whose config nests the teacher (config.teacher) and the FGM settings (config.fgm).
FGM_KINDS = ("fgm", "sd3_fgm")
# Jobs a kind runs its own way ("module:function(config, workdir)"), in place of main.RUNS.
JOBS = {
    "sd3_fgm": {"sample": "fgm_jax.sd3.one_step:sample",
                "export": "fgm_jax.sd3.one_step:export"},
    "sd3_folder": {"sample": "fgm_jax.sd3.sampler:run"},
}
# A kind's own config rules ("module:function(config)"), run by config_checks.validate after
# the checks every run shares (a kind that trains nothing: in their place).
CONFIG_RULES = {
    "sd3_fgm": "fgm_jax.sd3.config_rules:check_fgm",
    "sd3_folder": "fgm_jax.sd3.config_rules:check_folder_run",
}


def trains(name: str) -> bool:
  """Whether the kind has a trainer (an SD3 folder run only samples and caches prompts)."""
  return KINDS.get(name) is not None


def config_rules(name: str):
  """The kind's own config check, or None."""
  return registry.resolve(CONFIG_RULES, name, "config.trainer") if name in CONFIG_RULES else None


def resolve(name: str):
  """The TrainerKind registered under ``name`` (config.trainer)."""
  if name in KINDS and KINDS[name] is None:
    raise ValueError(f"config.trainer={name!r} trains nothing; it has no trainer.")
  return registry.resolve(KINDS, name, "config.trainer")


def job_function(kind: str, job: str, default_jobs: dict):
  """The function that runs ``job`` for a run of ``kind``: the kind's own, else the default."""
  return registry.resolve({**default_jobs, **JOBS.get(kind, {})}, job, "config.job")
