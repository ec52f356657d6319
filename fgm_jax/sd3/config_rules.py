"""The SD3 kinds' own config rules (sd3_fgm, sd3_folder), next to the SD3 code.

``config_checks.validate`` runs them through ``train/kinds.CONFIG_RULES`` after the checks
every run shares, so nothing outside ``sd3/`` knows SD3's fields.
"""

from fgm_jax.config_checks import batch_devices, check_batch, check_mesh_shape, check_model
from fgm_jax.config_checks import require


def check_fgm(config):
  """An SD3 FGM config (configs/sd3_fgm.py): its inputs, then what its training asks."""
  check_fgm_inputs(config)
  check_fgm_settings(config)


def check_folder_run(config):
  """SD3 folder runs (configs/sd3_prompts.py, configs/sd3_teacher.py): an SD3 folder, a
  prompt file, sizes."""
  require(config.job in ("prompt_cache", "sample"),
          f"config.job={config.job!r}: an SD3 folder config runs 'prompt_cache' or 'sample'.")
  check_folder(config)
  require(
      bool(config.prompts) or config.sd3.tiny_random, "config.prompts is not set; give a "
      "prompt file (one prompt per line, or JSONL with a 'prompt' field): "
      "--config.prompts=prompts.txt.")
  require(
      config.sd3.t5_length >= 1, f"config.sd3.t5_length={config.sd3.t5_length} must be "
      ">= 1 (256 as diffusers; 77 as several peers truncate).")
  check_mesh_shape(config.mesh)
  if config.job == "prompt_cache":
    require(config.shard_size >= 1, f"config.shard_size={config.shard_size} must be >= 1.")
    check_batch(config.batch_size, batch_devices(config))
  if config.job == "sample":
    s = config.sample
    require(
        s.steps >= 1 and s.batch_size >= 1 and s.num >= 0,
        f"config.sample: steps={s.steps}, batch_size={s.batch_size} must be >= 1 and "
        f"num={s.num} >= 0.")
    require(
        s.height % 16 == 0 and s.width % 16 == 0,
        f"config.sample.height={s.height}, width={s.width} must be multiples of 16 "
        "(the VAE's 8x downscale times the MM-DiT's 2x2 patches), e.g. 1024.")


def check_folder(config):
  tiny = config.sd3.tiny_random  # :runlocal builds the folder when it is not given
  require(
      bool(config.sd3.folder) or tiny, "config.sd3.folder is not set; point it at a "
      "local SD3 diffusers folder, e.g. "
      "--config.sd3.folder=stable-diffusion-3-medium-diffusers.")
  require(config.sd3.dtype in ("float32", "bfloat16"),
          f"config.sd3.dtype={config.sd3.dtype!r}: choose 'float32' or 'bfloat16'.")


def check_fgm_inputs(config):
  """SD3 FGM (configs/sd3_fgm.py): its jobs, the folder, the prompt cache and the MM-DiT's
  run keys (train, sample (one step, or GenEval) and export)."""
  require(
      config.job in ("train", "sample", "export", "compile"),
      f"config.job={config.job!r}: an SD3 FGM config runs 'train', 'sample', 'export' "
      "or 'compile' (prompt caches come from configs/sd3_prompts.py).")
  if config.job == "compile":
    from fgm_jax.models import mmdit
    name = config.aot.architecture
    require(
        not name or name in mmdit.ARCHITECTURES,
        f"config.aot.architecture={name!r} is unknown; choose one of "
        f"{sorted(mmdit.ARCHITECTURES)} or set config.sd3.folder.")
    require(
        bool(config.aot.architecture or config.sd3.folder or config.sd3.tiny_random),
        "config.job='compile' needs the MM-DiT's shape: --config.aot.architecture="
        "sd3-medium (built in, no files), or --config.sd3.folder=<an SD3 diffusers folder> "
        "(only its config.json files are read).")
  if not (config.job == "compile" and config.aot.architecture):
    check_folder(config)
  require(
      bool(config.prompt_cache) or config.sd3.tiny_random or config.job != "train",
      "config.prompt_cache is not set; write one with --config=configs/sd3_prompts.py "
      "(same sd3.folder) and pass --config.prompt_cache=<its workdir>.")
  check_model(config.teacher.model, "config.teacher")


def check_fgm_settings(config):
  """What SD3 FGM asks beyond every FGM run: t*=1, no training pictures, image sizes, no
  real data (its teacher is a folder without a data source)."""
  require(not config.fgm.real_data.enabled,
          "config.fgm.real_data.enabled=True: an SD3 FGM run is data-free (its teacher is a "
          "diffusers folder with no image data source to read real examples from); set "
          "--config.fgm.real_data.enabled=False.")
  require(
      config.fgm.t_star == 1.0,
      f"config.fgm.t_star={config.fgm.t_star}: SD3 FGM uses t_star=1, the generator "
      "x0 = z - v(z, 1, c), one Euler step of diffusers' scheduler (what the exported "
      "pipeline runs).")
  require(
      config.log.plot_every == 0 and config.eval.fid.every == 0,
      f"config.log.plot_every={config.log.plot_every}, config.eval.fid.every="
      f"{config.eval.fid.every}: SD3 FGM runs draw no pictures or FID while training (their "
      "images need the VAE and prompts); set both to 0, draw images with "
      "--config.job=sample and score them with GenEval (BUILD.md).")
  require(
      config.resolution % 16 == 0 and config.resolution > 0,
      f"config.resolution={config.resolution} must be a positive multiple of 16 (the "
      "VAE's 8x downscale times the MM-DiT's 2x2 patches), e.g. 512.")
  s = config.sample
  require(
      s.batch_size >= 1 and s.num >= 0 and s.images_per_prompt >= 1,
      f"config.sample: batch_size={s.batch_size}, images_per_prompt="
      f"{s.images_per_prompt} must be >= 1 and num={s.num} >= 0.")
