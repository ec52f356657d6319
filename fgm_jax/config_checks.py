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
from fgm_jax import parallel
from fgm_jax.train import kinds
from fgm_jax.train import optim

JOBS = ("teacher", "distill", "sample", "evaluate", "pipeline", "export", "prompt_cache",
        "compile")
# The jobs of a distillation config that read the teacher's checkpoint. Sampling and exporting
# a distilled generator need only its own run: the teacher may have been moved or deleted.
TEACHER_JOBS = ("distill", "evaluate")


class ConfigError(ValueError):
  """A config value that cannot work; the message says which field and how to fix it."""


def _require(ok: bool, message: str):
  if not ok:
    raise ConfigError(message)


def _require_none(problem):
  """A section's own check (its module's check_config) found ``problem``."""
  if problem:
    raise ConfigError(problem)


def _check_model(model, field: str):
  _require(model.name in models.names(),
           f"{field}.model.name={model.name!r} is not a known model; choose one of "
           f"{models.names()}.")
  problem = models.config_problem(model)
  _require(problem is None, f"{field}.{problem}")


def _check_model_and_data(model, data, field: str):
  _check_model(model, field)
  _require(data.name in data_lib.names(),
           f"{field}.data.name={data.name!r} is not a known dataset; choose one of "
           f"{data_lib.names()}.")
  problem = data_lib.config_problem(data)
  _require(problem is None, f"{field}.{problem}")


def _check_mesh_shape(mesh, device_count=None):
  """Axis sizes that fit this machine's devices (or job=compile's topology)."""
  n = device_count or jax.device_count()
  try:
    parallel.mesh_shape(mesh.data, mesh.fsdp, mesh.tensor, n)
  except ValueError as e:
    raise ConfigError(f"{e} (there are {n} devices)") from None


def _check_mesh(mesh, model, device_count=None):
  """Axis sizes that fit the devices, and rules that name only mesh axes."""
  _check_mesh_shape(mesh, device_count)
  for rule in models.sharding_rules(mesh, model):
    axes = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
    _require(len(rule) == 2 and set(a for a in axes if a) <= set(parallel.MESH_AXES),
             f"config.mesh.rules entry {rule!r} must be (logical name, mesh axis or axes) "
             f"with mesh axes from {parallel.MESH_AXES}.")


def check_batch(batch_size: int, device_count: int, field: str = "config.batch_size"):
  _require(batch_size > 0, f"{field}={batch_size} must be > 0.")
  _require(batch_size % device_count == 0,
           f"{field}={batch_size} is not divisible by the {device_count} devices the "
           f"batch is split over; use a multiple of {device_count} "
           f"(e.g. --{field}={device_count * max(1, batch_size // device_count)}).")
  _require(batch_size % jax.process_count() == 0,
           f"config.batch_size={batch_size} is not divisible by the {jax.process_count()} "
           "processes; use a multiple of the process count.")


def _check_teacher_checkpoint(teacher):
  path = teacher.workdir
  _require(bool(path), "config.teacher.workdir is empty; set it to the --workdir of a "
           "finished teacher run, e.g. --config.teacher.workdir=runs/toy2d_teacher.")
  ckpt_dir = checkpoint.checkpoint_dir(path)
  _require(checkpoint.latest_step(ckpt_dir) is not None,
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
  _require(config.job in JOBS, f"config.job={config.job!r} is unknown; choose one of {JOBS}.")
  _check_trainer(config)
  if config.job == "compile" and device_count is None:
    return _check_compile(config)
  if config.trainer == "sd3_folder":
    return _check_sd3(config)
  if is_sd3_distill(config):
    _check_sd3_fgm(config)
  elif is_distill(config):
    _check_model_and_data(config.teacher.model, config.teacher.data, "config.teacher")
  else:
    _require(config.job not in ("distill", "pipeline", "export"),
             f"config.job={config.job!r} needs a distillation config with config.teacher and "
             "config.fgm (e.g. configs/toy2d_fgm.py); this one describes a teacher run.")
    _check_model_and_data(config.model, config.data, "config")
  _check_training(config, device_count)


def _check_training(config, device_count=None):
  """What every training run shares, whatever its kind or teacher source: one path."""
  sd3 = is_sd3_distill(config)
  if is_distill(config):
    _require_none(fgm.check_config(config.fgm))
  if sd3:
    _check_sd3_fgm_settings(config)
  _require_none(optim.check_config(config.optim, "config.optim"))
  if is_distill(config):
    _require_none(optim.check_config(config.online_optim, "config.online_optim"))
  if is_distill(config) and not sd3:  # a teacher run's checkpoint (the folder's is checked above)
    _require_none(optim.check_config(config.teacher.optim, "config.teacher.optim"))
    if config.job in TEACHER_JOBS:  # (the pipeline trains its own teacher first)
      _check_teacher_checkpoint(config.teacher)
  _check_mesh(config.mesh, architecture(config)[0], device_count)
  check_batch(config.batch_size, _batch_devices(config, device_count))
  _require(config.num_steps >= 1, f"config.num_steps={config.num_steps} must be >= 1.")
  if not sd3:  # (an SD3 generator samples in one step: its sample section has no steps)
    _require(config.sample.steps >= 1,
             f"config.sample.steps={config.sample.steps} must be >= 1.")
    _require(config.sample.method in flow.SAMPLERS,
             f"config.sample.method={config.sample.method!r} is unknown; choose one of "
             f"{sorted(flow.SAMPLERS)}.")
  _require(config.checkpoint.every >= 1,
           f"config.checkpoint.every={config.checkpoint.every} must be >= 1.")


def _check_trainer(config):
  """config.trainer names a known kind and the config has that kind's sections."""
  _require(config.trainer in kinds.KINDS,
           f"config.trainer={config.trainer!r} is unknown; choose one of {sorted(kinds.KINDS)} "
           "(configs/common.py: base(job, trainer)).")
  if is_distill(config):
    missing = [k for k in ("teacher", "fgm") if k not in config]
    _require(not missing, f"config.trainer={config.trainer!r} distils a teacher, but the "
             f"config has no {' or '.join('config.' + k for k in missing)}; start it from a "
             "distillation config such as configs/toy2d_fgm.py.")


def _check_sd3(config):
  """SD3 folder runs (configs/sd3_prompts.py, configs/sd3_teacher.py): an SD3 folder, a
  prompt file, sizes."""
  _require(config.job in ("prompt_cache", "sample"),
           f"config.job={config.job!r}: an SD3 folder config runs 'prompt_cache' or 'sample'.")
  _check_sd3_folder(config)
  _require(bool(config.prompts) or config.sd3.tiny_random, "config.prompts is not set; give a "
           "prompt file (one prompt per line, or JSONL with a 'prompt' field): "
           "--config.prompts=prompts.txt.")
  _require(config.sd3.t5_length >= 1, f"config.sd3.t5_length={config.sd3.t5_length} must be "
           ">= 1 (256 as diffusers; 77 as several peers truncate).")
  _check_mesh_shape(config.mesh)
  if config.job == "prompt_cache":
    _require(config.shard_size >= 1, f"config.shard_size={config.shard_size} must be >= 1.")
    check_batch(config.batch_size, _batch_devices(config))
  if config.job == "sample":
    s = config.sample
    _require(s.steps >= 1 and s.batch_size >= 1 and s.num >= 0,
             f"config.sample: steps={s.steps}, batch_size={s.batch_size} must be >= 1 and "
             f"num={s.num} >= 0.")
    _require(s.height % 16 == 0 and s.width % 16 == 0,
             f"config.sample.height={s.height}, width={s.width} must be multiples of 16 "
             "(the VAE's 8x downscale times the MM-DiT's 2x2 patches), e.g. 1024.")


def _check_sd3_folder(config):
  tiny = config.sd3.tiny_random  # :runlocal builds the folder when it is not given
  _require(bool(config.sd3.folder) or tiny, "config.sd3.folder is not set; point it at a "
           "local SD3 diffusers folder, e.g. "
           "--config.sd3.folder=stable-diffusion-3-medium-diffusers.")
  _require(config.sd3.dtype in ("float32", "bfloat16"),
           f"config.sd3.dtype={config.sd3.dtype!r}: choose 'float32' or 'bfloat16'.")


def _check_sd3_fgm(config):
  """SD3 FGM (configs/sd3_fgm.py): its jobs, the folder, the prompt cache and the MM-DiT's
  run keys (distill, sample (one step, or GenEval) and export)."""
  _require(config.job in ("distill", "sample", "export", "compile"),
           f"config.job={config.job!r}: an SD3 FGM config runs 'distill', 'sample', 'export' "
           "or 'compile' (prompt caches come from configs/sd3_prompts.py).")
  if config.job == "compile":
    from fgm_jax.models import mmdit
    name = config.aot.architecture
    _require(not name or name in mmdit.ARCHITECTURES,
             f"config.aot.architecture={name!r} is unknown; choose one of "
             f"{sorted(mmdit.ARCHITECTURES)} or set config.sd3.folder.")
    _require(bool(config.aot.architecture or config.sd3.folder or config.sd3.tiny_random),
             "config.job='compile' needs the MM-DiT's shape: --config.aot.architecture="
             "sd3-medium (built in, no files), or --config.sd3.folder=<an SD3 diffusers folder> "
             "(only its config.json files are read).")
  if not (config.job == "compile" and config.aot.architecture):
    _check_sd3_folder(config)
  _require(bool(config.prompt_cache) or config.sd3.tiny_random or config.job != "distill",
           "config.prompt_cache is not set; write one with --config=configs/sd3_prompts.py "
           "(same sd3.folder) and pass --config.prompt_cache=<its workdir>.")
  _check_model(config.teacher.model, "config.teacher")


def _check_sd3_fgm_settings(config):
  """What SD3 FGM asks beyond every FGM run: t*=1, no training pictures, image sizes."""
  _require(config.fgm.t_star == 1.0,
           f"config.fgm.t_star={config.fgm.t_star}: SD3 FGM uses t_star=1, the generator "
           "x0 = z - v(z, 1, c), one Euler step of diffusers' scheduler (what the exported "
           "pipeline runs).")
  _require(config.log.plot_every == 0 and config.eval.fid.every == 0,
           f"config.log.plot_every={config.log.plot_every}, config.eval.fid.every="
           f"{config.eval.fid.every}: SD3 FGM runs draw no pictures or FID while training (their "
           "images need the VAE and prompts); set both to 0, draw images with "
           "--config.job=sample and score them with GenEval (BUILD.md).")
  _require(config.resolution % 16 == 0 and config.resolution > 0,
           f"config.resolution={config.resolution} must be a positive multiple of 16 (the "
           "VAE's 8x downscale times the MM-DiT's 2x2 patches), e.g. 512.")
  s = config.sample
  _require(s.batch_size >= 1 and s.num >= 0 and s.images_per_prompt >= 1,
           f"config.sample: batch_size={s.batch_size}, images_per_prompt="
           f"{s.images_per_prompt} must be >= 1 and num={s.num} >= 0.")


def _check_compile(config):
  """job=compile before the devices are known: only the run kind's own fields."""
  _require(config.trainer != "sd3_folder",
           "config.job='compile' compiles training runs (teacher, FGM, SD3 FGM configs); "
           "this SD3 config samples or caches prompts.")
  _require(config.aot.sample_batch >= 0,
           f"config.aot.sample_batch={config.aot.sample_batch} must be >= 0 (0: batch_size).")


def _batch_devices(config, device_count=None):
  mesh = config.mesh
  n = device_count or jax.device_count()
  if mesh.data == -1:
    return n // mesh.tensor
  return mesh.data * mesh.fsdp


def is_distill(config) -> bool:
  """A distillation config (config.trainer declares it): config.teacher and config.fgm."""
  return config.trainer in kinds.DISTILL_KINDS


def is_sd3_distill(config) -> bool:
  """An SD3 FGM config: its teacher is an SD3 diffusers folder (configs/sd3_fgm.py)."""
  return config.trainer == "sd3_fgm"


def run_kind(config) -> str:
  """'distill' or 'teacher': the training job that writes this config's checkpoints."""
  return "distill" if is_distill(config) else "teacher"


def architecture(config):
  """(model, data) configs that define the state's shapes, for every kind of run; an SD3
  teacher has no data set, so its data part is the image size the latents come from."""
  if is_sd3_distill(config):
    return config.teacher.model, ml_collections.ConfigDict(dict(resolution=config.resolution))
  if is_distill(config):
    return config.teacher.model, config.teacher.data
  return config.model, config.data
