"""The distilled one-step SD3 generator: images (job=sample) and a diffusers folder (job=export).

    python -m fgm_jax.main --config=configs/sd3_fgm.py --config.job=sample --workdir=RUN ...
        -> RUN/images/<index>_seed<seed>.png, RUN/grid.png       (config.prompts)
        -> RUN/geneval/00000/samples/0000.png ...                 (config.sample.geneval)
    python -m fgm_jax.main --config=configs/sd3_fgm.py --config.job=export --workdir=RUN ...
        -> RUN/diffusers/ (or config.export.output)

The generator is x0 = z - v_theta(z, 1, c): one Euler step of diffusers' flow-match scheduler
from sigma = 1 to 0 with the distilled MM-DiT and no guidance. So sampling is the teacher's
sampler (sampler.py) with 1 step, guidance 1 and the generator's weights, and the exported
folder is an ordinary SD3 folder whose transformer/ is the generator: diffusers'
StableDiffusion3Pipeline runs it with num_inference_steps=1, guidance_scale=1.0.
"""

import json
import os
import shutil
import tempfile
import time

import jax
import ml_collections
import numpy as np

from fgm_jax import config_checks
from fgm_jax import distributed
from fgm_jax import paths
from fgm_jax.sd3 import text
from fgm_jax.sd3 import tiny

EXPORT_NOTE = "fgm_jax.json"


def restore_generator(config, workdir, weights="ema"):
  """(prepared config, trainer, step, generator params on the host, which weights those are:
  'ema', 'raw', 'ema_<decay>') of the newest checkpoint; 'ema' of a run without EMA gives its
  raw weights. Only those weights are read (run_dir.restore_generator): no teacher, prompt
  cache or optimizer."""
  from fgm_jax.train import run_dir
  g = run_dir.restore_generator(config, workdir, weights)
  return g.config, g.trainer, g.step, jax.device_get(g.params), g.weights


def generator_weights(trainer, params):
  """The one-step generator's MM-DiT weights (host numpy): the checkpoint's, or -- a LoRA
  run's adapters (config.lora) -- merged into the teacher folder's own weights, W + s A B
  (what the LoRA file gives in diffusers)."""
  if trainer.lora is None:
    return params
  return trainer.lora.merge(params, trainer.source.load(None))


def sampling_config(config):
  """The teacher-sampler config that runs the generator: 1 step, no guidance."""
  s = config.sample
  return ml_collections.ConfigDict(dict(
      job="sample", seed=config.seed, mesh=config.mesh.to_dict(), sd3=config.sd3.to_dict(),
      prompts=config.prompts,
      sample=dict(num=s.num, steps=1, guidance=1.0, height=config.resolution,
                  width=config.resolution, seed=s.seed, batch_size=s.batch_size,
                  images_per_prompt=s.images_per_prompt)))


def sample(config, workdir):
  """job=sample: one-step images for config.prompts, or GenEval's layout."""
  from fgm_jax.sd3 import sampler
  if config.sample.geneval and jax.process_count() > 1:
    raise config_checks.ConfigError(
        "config.sample.geneval runs in one process (each GenEval folder is written by the "
        "process that samples it); run it on one host.")
  if not config.sample.geneval and not config.prompts and not config.sd3.tiny_random:
    raise config_checks.ConfigError(
        "config.prompts is not set; give a prompt file for job=sample "
        "(--config.prompts=prompts.txt) or GenEval's metadata (--config.sample.geneval=...).")
  if config.sample.geneval:  # its prompts checked before the (long) restore
    sampler.geneval_metadata(config.sample.geneval, config.sample.num)
  start = time.time()
  config, trainer, step, params, weights = restore_generator(config, workdir,
                                                            config.sample.weights)
  params = generator_weights(trainer, params)
  print(f"one-step generator of step {step} restored ({weights} weights, "
        f"{time.time() - start:.1f} s)")
  sconfig = sampling_config(config)
  if config.sample.geneval:
    return sampler.geneval(sconfig, workdir, config.sample.geneval, mmdit_params=params,
                           sharding=trainer.sharding)
  return sampler.run(sconfig, workdir, mmdit_params=params, sharding=trainer.sharding)


def _link_or_copy(src, dst):
  """Hard link (no extra disk for SD3's 10 GB of text encoders) where possible, else copy."""
  try:
    os.link(src, dst)
  except OSError:
    shutil.copy2(src, dst)


def require_pipeline_parts(folder):
  """Stops unless ``folder`` holds every part its model_index.json lists (what diffusers'
  from_pretrained loads; the export copies them beside the generator), naming the first
  missing one. The transformer is not needed: the generator replaces it."""
  index_path = os.path.join(folder, "model_index.json")
  text.require_part(index_path, "model_index.json (the list of the pipeline's parts)")
  with open(index_path) as f:
    index = json.load(f)
  for name, spec in sorted(index.items()):
    listed = isinstance(spec, list) and spec and spec[0] is not None  # [null, null]: absent
    if name.startswith("_") or name == "transformer" or not listed:
      continue
    path = os.path.join(folder, name)
    if not (os.path.isdir(path) and os.listdir(path)):
      raise text.SD3FolderError(
          f"config.sd3.folder={folder!r} lacks {name}/ ({spec[-1]}), which its "
          "model_index.json lists: diffusers could not load the export. Point "
          "--config.sd3.folder at the complete SD3 folder the run was distilled from.")


def _write_generator(folder, module, params, dtype, note):
  """transformer/ (the generator's weights) and the export note, into a local ``folder``."""
  from fgm_jax.convert import diffusers as dconv
  from fgm_jax.models import mmdit
  dconv.save_params(os.path.join(folder, "transformer"), "mmdit",
                    mmdit.diffusers_config(module), params, dtype=jax.numpy.dtype(dtype))
  with open(os.path.join(folder, EXPORT_NOTE), "w") as f:
    json.dump(note or {}, f, indent=2)


def _local_files(folder, skip=()):
  """(path, path relative to ``folder``) of every file under it, top-level names in ``skip``
  left out."""
  out = []
  for name in sorted(os.listdir(folder)):
    src = os.path.join(folder, name)
    if name in skip:
      continue
    if not os.path.isdir(src):
      out.append((src, name))
      continue
    for root, dirs, names in os.walk(src):
      dirs.sort()
      out += [(os.path.join(root, n), os.path.relpath(os.path.join(root, n), folder))
              for n in sorted(names)]
  return out


def _upload_pipeline_folder(teacher_folder, out, module, params, *, dtype, note):
  """write_pipeline_folder for a gs:// ``out``. A bucket has no links and no folder rename (a
  copy per object), so every file is uploaded to its final name (the teacher's parts copied
  from the local ``teacher_folder``; the generator written to a local temporary folder
  first) and model_index.json last: diffusers loads nothing without it, so a folder holding
  it is complete. An earlier export there is removed first."""
  out = out.rstrip("/")
  paths.rmtree(out)
  with tempfile.TemporaryDirectory(prefix="fgm_jax_export_") as local:
    _write_generator(local, module, params, dtype, note)
    files = (_local_files(teacher_folder, skip=("transformer", EXPORT_NOTE))
             + _local_files(local))
    files.sort(key=lambda f: f[1] == "model_index.json")  # stable: the rest keep their order
    for src, rel in files:
      paths.upload(src, f"{out}/{rel}")
  return out


def write_pipeline_folder(teacher_folder, out, module, params, *, dtype="float32", note=None):
  """``teacher_folder`` with transformer/ replaced by ``params`` (an MM-DiT of ``module``'s
  architecture), written to ``out``. Built under a temporary name and renamed when complete;
  in a gs:// bucket uploaded in place (_upload_pipeline_folder)."""
  if paths.is_remote(out):
    return _upload_pipeline_folder(teacher_folder, out, module, params, dtype=dtype, note=note)
  tmp = out.rstrip("/") + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  for name in sorted(os.listdir(teacher_folder)):
    src = os.path.join(teacher_folder, name)
    if name == "transformer" or name == EXPORT_NOTE:
      continue
    if os.path.isdir(src):
      shutil.copytree(src, os.path.join(tmp, name), copy_function=_link_or_copy)
    else:
      _link_or_copy(src, os.path.join(tmp, name))
  _write_generator(tmp, module, params, dtype, note)
  shutil.rmtree(out, ignore_errors=True)
  os.replace(tmp, out)
  return out


def export(config, workdir):
  """job=export: the newest checkpoint's generator as a diffusers SD3 folder."""
  e = config.export
  _require_dtype(e.dtype)
  # Before restoring: from an incomplete teacher folder, diffusers could not load the export.
  require_pipeline_parts(tiny.resolve(config, workdir).sd3.folder)
  config, trainer, step, params, weights = restore_generator(config, workdir, e.weights)
  out = e.output or os.path.join(workdir, "diffusers")
  if not distributed.is_writer():
    return out
  note = {"format": "fgm_jax.sd3_one_step/1", "teacher_folder": os.path.abspath(
      config.sd3.folder), "step": step, "weights": weights,
      "run": {"num_inference_steps": 1, "guidance_scale": 1.0},
      "fgm": config.fgm.to_dict(), "resolution": config.resolution}
  if trainer.lora is not None:
    note["lora"] = dict(config.lora.to_dict(), file=write_lora_file(config, workdir, trainer,
                                                                    params))
  write_pipeline_folder(config.sd3.folder, out, trainer.model,
                        generator_weights(trainer, params), dtype=e.dtype, note=note)
  print(f"wrote {out}: a diffusers StableDiffusion3Pipeline folder; run it with "
        "num_inference_steps=1, guidance_scale=1.0")
  return out


def write_lora_file(config, workdir, trainer, adapters):
  """A LoRA run's adapters as diffusers' SD3 LoRA file (convert/sd3_lora.py), checked
  against the teacher folder it applies to: <workdir>/lora/pytorch_lora_weights.safetensors
  or config.export.lora_output. Loads with pipe.load_lora_weights(...) onto the teacher's
  StableDiffusion3Pipeline (1 step, guidance 1)."""
  from fgm_jax.convert import diffusers as dconv
  from fgm_jax.convert import sd3_lora
  state = sd3_lora.state_from_adapters(adapters, trainer.model, trainer.lora.scale,
                                       np.dtype(jax.numpy.dtype(config.export.dtype)))
  transformer = os.path.join(config.sd3.folder, "transformer")
  sd3_lora.check_fits(state, dconv.read_config(transformer), "the run's adapters",
                      repr(transformer))
  out = config.export.lora_output or os.path.join(workdir, "lora")
  if paths.is_remote(out):
    with tempfile.TemporaryDirectory(prefix="fgm_jax_lora_") as local:
      local_file = sd3_lora.save(local, state)
      dest = out if out.endswith(".safetensors") else f"{out.rstrip('/')}/{sd3_lora.WEIGHT_NAME}"
      paths.upload(local_file, dest)
  else:
    dest = sd3_lora.save(out, state)
  print(f"wrote {dest}: diffusers' SD3 LoRA file {sd3_lora.describe(state)}; load it with "
        "pipe.load_lora_weights(...) on the teacher's StableDiffusion3Pipeline")
  return dest


def _require_dtype(dtype):
  if dtype not in ("float32", "bfloat16"):
    raise config_checks.ConfigError(
        f"config.export.dtype={dtype!r}: choose 'float32' or 'bfloat16' (half the files).")
