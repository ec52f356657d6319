"""Up-front validation of a run's ConfigDict: every error names the field and the fix.

Runs before any model is built or compiled, so a bad value costs seconds, not a compile.
"""

import jax
import ml_collections

from fgm_jax import checkpoint
from fgm_jax import data as data_lib
from fgm_jax import fgm
from fgm_jax import flow
from fgm_jax import models
from fgm_jax import sharding as sharding_lib
from fgm_jax.models import lora as lora_lib
from fgm_jax.train import kinds
from fgm_jax.train import optim

JOBS = ("train", "sample", "evaluate", "pipeline", "export", "prompt_cache", "compile")
# The jobs of a distillation config that read the teacher's checkpoint. Sampling and exporting
# a distilled generator need only its own run: the teacher may have been moved or deleted.
TEACHER_JOBS = ("train", "evaluate")
# Job names before config.trainer was declared (both trained): refused with the new name.
RENAMED_JOBS = ("teacher", "distill")


class ConfigError(ValueError):
  """A config value that cannot work; the message says which field and how to fix it."""


def require(ok: bool, message: str):
  if not ok:
    raise ConfigError(message)


def require_none(problem):
  """A section's own check (its module's check_config) found ``problem``."""
  if problem:
    raise ConfigError(problem)


def check_model(model, field: str):
  require(
      model.name in models.names(),
      f"{field}.model.name={model.name!r} is not a known model; choose one of "
      f"{models.names()}.")
  problem = models.config_problem(model)
  require(problem is None, f"{field}.{problem}")


def check_model_and_data(model, data, field: str):
  check_model(model, field)
  require(
      data.name in data_lib.names(),
      f"{field}.data.name={data.name!r} is not a known dataset; choose one of "
      f"{data_lib.names()}.")
  problem = data_lib.config_problem(data)
  require(problem is None, f"{field}.{problem}")


def check_mesh_shape(mesh, device_count=None):
  """Axis sizes that fit this machine's devices (or job=compile's topology)."""
  n = device_count or jax.device_count()
  try:
    sharding_lib.mesh_shape(mesh.data, mesh.fsdp, mesh.tensor, n)
  except ValueError as e:
    raise ConfigError(f"{e} (there are {n} devices)") from None


def _check_mesh(mesh, model, device_count=None):
  """Axis sizes that fit the devices, and rules that name only mesh axes."""
  check_mesh_shape(mesh, device_count)
  for rule in models.sharding_rules(mesh, model):
    axes = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
    require(
        len(rule) == 2 and set(a for a in axes if a) <= set(sharding_lib.MESH_AXES),
        f"config.mesh.rules entry {rule!r} must be (logical name, mesh axis or axes) "
        f"with mesh axes from {sharding_lib.MESH_AXES}.")


def check_batch(batch_size: int, device_count: int, field: str = "config.batch_size"):
  require(batch_size > 0, f"{field}={batch_size} must be > 0.")
  require(
      batch_size % device_count == 0,
      f"{field}={batch_size} is not divisible by the {device_count} devices the "
      f"batch is split over; use a multiple of {device_count} "
      f"(e.g. --{field}={device_count * max(1, batch_size // device_count)}).")
  require(
      batch_size % jax.process_count() == 0,
      f"config.batch_size={batch_size} is not divisible by the {jax.process_count()} "
      "processes; use a multiple of the process count.")


def _check_teacher_checkpoint(teacher):
  path = teacher.workdir
  require(
      bool(path), "config.teacher.workdir is empty; set it to the --workdir of a "
      "finished teacher run, e.g. --config.teacher.workdir=runs/toy2d_teacher.")
  ckpt_dir = checkpoint.checkpoint_dir(path)
  require(
      checkpoint.latest_step(ckpt_dir) is not None,
      f"config.teacher.workdir={path!r}: no teacher checkpoint found in {ckpt_dir}. "
      "Train the teacher first (python -m fgm_jax.main --config=<teacher config> "
      f"--workdir={path}) or point --config.teacher.workdir at its workdir"
      f"{_teacher_import_hint(teacher)}.")


def _teacher_import_hint(teacher) -> str:
  """The other way to a CIFAR-10 teacher, the published one (README, 'CIFAR-10 with the
  published teacher'); '' for teachers that have none."""
  if teacher.data.name != "tfds" or teacher.data.tfds_name != "cifar10":
    return ""
  return ("; or import the published 1-Rectified-Flow teacher: python -m "
          "fgm_jax.convert.rectified_flow checkpoint_8.pth runs/cifar10_rf_teacher, then "
          "distil it with --config=configs/cifar10_fgm.py:rf_teacher "
          "--config.teacher.workdir=runs/cifar10_rf_teacher")


def validate(config, device_count=None):
  """Raises ConfigError for the first unusable value. Cheap: no model is built.

  job=compile checks only what the training job needs beyond files (no checkpoint, folder or
  prompt cache); aot.run validates it again with the topology's ``device_count``.
  """
  require(
      config.job not in RENAMED_JOBS, f"config.job={config.job!r} is now 'train': one "
      "job trains every kind of run, and config.trainer (here "
      f"{config.trainer!r}) says which; pass --config.job=train.")
  require(config.job in JOBS, f"config.job={config.job!r} is unknown; choose one of {JOBS}.")
  _check_trainer(config)
  if config.job == "compile" and device_count is None:
    return _check_compile(config)
  own_rules = kinds.config_rules(config.trainer)  # a kind's own sections (SD3's folder, ...)
  if not kinds.trains(config.trainer):
    return own_rules(config)
  if own_rules:
    own_rules(config)
  elif is_fgm(config):
    check_model_and_data(config.teacher.model, config.teacher.data, "config.teacher")
  else:
    require(
        config.job not in ("pipeline", "export"),
        f"config.job={config.job!r} needs a distillation config with config.teacher and "
        "config.fgm (e.g. configs/toy2d_fgm.py); this one describes a teacher run.")
    check_model_and_data(config.model, config.data, "config")
  _check_training(config, device_count)


def _check_training(config, device_count=None):
  """What every training run shares, whatever its kind or teacher source: one path."""
  sd3 = is_sd3_fgm(config)  # its teacher is a folder, not a run; it samples in one step
  if is_fgm(config):
    require_none(fgm.check_config(config.fgm))
  require_none(optim.check_config(config.optim, "config.optim", extra_emas=is_fgm(config)))
  _check_weights(config)
  if is_fgm(config):
    require_none(optim.check_config(config.online_optim, "config.online_optim"))
    _check_lora(config)
  if is_fgm(config) and not sd3:  # a teacher run's checkpoint (the folder's is checked above)
    require_none(optim.check_config(config.teacher.optim, "config.teacher.optim"))
    if config.job in TEACHER_JOBS:  # (the pipeline trains its own teacher first)
      _check_teacher_checkpoint(config.teacher)
  _check_mesh(config.mesh, architecture(config)[0], device_count)
  check_batch(config.batch_size, batch_devices(config, device_count))
  require(config.num_steps >= 1, f"config.num_steps={config.num_steps} must be >= 1.")
  if not sd3:  # (an SD3 generator samples in one step: its sample section has no steps)
    require(config.sample.steps >= 1, f"config.sample.steps={config.sample.steps} must be >= 1.")
    require(
        config.sample.method in flow.SAMPLERS,
        f"config.sample.method={config.sample.method!r} is unknown; choose one of "
        f"{sorted(flow.SAMPLERS)}.")
  require(config.checkpoint.every >= 1,
          f"config.checkpoint.every={config.checkpoint.every} must be >= 1.")


def _check_lora(config):
  """config.lora: a model with adapters, known targets; adapters start as the teacher."""
  require_none(lora_lib.targets_problem(config.lora,
                                        models.lora_targets(architecture(config)[0])))
  f = config.fgm
  require(
      config.lora.rank == 0 or f.init_generator == f.init_online == "teacher",
      f"config.fgm.init_generator={f.init_generator!r}, init_online={f.init_online!r}: "
      "low-rank adapters (config.lora.rank > 0) start as the teacher (B = 0); set both to "
      "'teacher', or config.lora.rank=0 for other starts (random ablations, a first run).")


# The section whose ``weights`` names the generator weights a job uses.
WEIGHTS_SECTIONS = {"sample": "sample", "export": "export", "evaluate": "eval",
                    "pipeline": "eval"}


def _check_weights(config):
  """The weights a job asks for by name are ones the run keeps (config.optim's EMAs)."""
  section = WEIGHTS_SECTIONS.get(config.job)
  if section:
    require_none(optim.check_weights(config.optim, config[section].weights,
                                     f"config.{section}.weights"))


def _check_trainer(config):
  """config.trainer names a known kind and the config has that kind's sections."""
  require(
      config.trainer in kinds.KINDS,
      f"config.trainer={config.trainer!r} is unknown; choose one of {sorted(kinds.KINDS)} "
      "(configs/common.py: base(job, trainer)).")
  if is_fgm(config):
    missing = [k for k in ("teacher", "fgm") if k not in config]
    require(
        not missing, f"config.trainer={config.trainer!r} distils a teacher, but the "
        f"config has no {' or '.join('config.' + k for k in missing)}; start it from a "
        "distillation config such as configs/toy2d_fgm.py.")


def _check_compile(config):
  """job=compile before the devices are known: only the run kind's own fields."""
  require(
      kinds.trains(config.trainer),
      "config.job='compile' compiles training runs (teacher, FGM, SD3 FGM configs); "
      "this SD3 config samples or caches prompts.")
  require(config.aot.sample_batch >= 0,
          f"config.aot.sample_batch={config.aot.sample_batch} must be >= 0 (0: batch_size).")


def batch_devices(config, device_count=None):
  mesh = config.mesh
  n = device_count or jax.device_count()
  if mesh.data == -1:
    return n // mesh.tensor
  return mesh.data * mesh.fsdp


def is_fgm(config) -> bool:
  """A distillation config (config.trainer declares it): config.teacher and config.fgm."""
  return config.trainer in kinds.FGM_KINDS


def is_sd3_fgm(config) -> bool:
  """An SD3 FGM config: its teacher is an SD3 diffusers folder (configs/sd3_fgm.py)."""
  return config.trainer == "sd3_fgm"


def run_kind(config) -> str:
  """'fgm' or 'teacher': which kind of training wrote (or writes) this config's checkpoints."""
  return "fgm" if is_fgm(config) else "teacher"


def architecture(config):
  """(model, data) configs that define the state's shapes, for every kind of run; an SD3
  teacher has no data set, so its data part is the image size the latents come from."""
  if is_sd3_fgm(config):
    return config.teacher.model, ml_collections.ConfigDict(dict(resolution=config.resolution))
  if is_fgm(config):
    return config.teacher.model, config.teacher.data
  return config.model, config.data
