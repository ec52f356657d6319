"""SD3 text-to-image sampling in JAX from a local diffusers folder: the multi-step teacher.

    prompts -> encode (text.py) -> Euler on diffusers' flow-match grid with SD3's shift and
    classifier-free guidance -> VAE decode with SD3's scaling/shift factors -> images

``sample_latents`` and ``decode`` are pure functions (jit and shard like everything else);
with the same initial latents they give what ``StableDiffusion3Pipeline`` gives
(tests/parity/test_sd3_sampler.py). ``run`` is job=sample for an SD3 config (configs/sd3_teacher.py):
PNGs named by prompt index and seed, plus a grid.
"""

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from fgm_jax import flow
from fgm_jax.sd3 import text

@dataclasses.dataclass(frozen=True)
class SD3:
  """The parts of an SD3 folder that sample: MM-DiT, VAE, text encoders, scheduler shift."""
  mmdit: Any
  mmdit_params: Any
  vae: Any
  vae_params: Any
  encoders: text.TextEncoders
  shift: float
  num_train_timesteps: int

  @property
  def latent_downscale(self) -> int:
    from fgm_jax.models import vae
    return vae.downscale(self.vae.block_out_channels)


def load(folder: str, t5_length: int = text.DEFAULT_T5_LENGTH, dtype=jnp.float32,
         attention_impl: str = "xla") -> SD3:
  from fgm_jax.convert import diffusers as dconv
  from fgm_jax.models import mmdit, vae
  dtype = jnp.dtype(dtype)
  encoders = text.load(folder, t5_length=t5_length, dtype=dtype)  # checks the layout first
  for sub in ("vae", "scheduler"):
    text.require_part(os.path.join(folder, sub), f"{sub}/")
  t_config, t_params = dconv.load_params(os.path.join(folder, "transformer"), "mmdit")
  v_config, v_params = dconv.load_params(os.path.join(folder, "vae"), "vae")
  with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
    scheduler = json.load(f)
  return SD3(mmdit=mmdit.from_diffusers_config(t_config, dtype=dtype,
                                               attention_impl=attention_impl),
             mmdit_params=t_params, vae=vae.from_config(v_config, dtype=dtype),
             vae_params=v_params, encoders=encoders, shift=float(scheduler.get("shift", 1.0)),
             num_train_timesteps=int(scheduler.get("num_train_timesteps", 1000)))


def sample_latents(mmdit, params, noise, cond, null_cond, ts, guidance: float):
  """Euler along ``ts`` with CFG: v = v(x, t, null) + w (v(x, t, cond) - v(x, t, null))."""
  def velocity(x, t, c):
    return mmdit.apply({"params": params}, x, t, c)
  return flow.euler_on_grid(flow.guided(velocity, cond, null_cond, guidance), noise, ts)


def decode(vae_module, vae_variables, latents):
  """Diffusion latents -> images in [0, 1] (NHWC), as diffusers' output_type='np'.

  ``vae_variables``: {'params': ...} as convert.diffusers.load_params gives them for a VAE.
  """
  from fgm_jax.models import vae
  images = vae.images_from_latents(vae_module, vae_variables, latents)
  return jnp.clip(images / 2 + 0.5, 0.0, 1.0)


def initial_noise(seed: int, index: int, shape) -> np.ndarray:
  """The starting latents of prompt ``index`` for ``seed``: reproducible per image, whatever
  the batch it lands in."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed), index)
  return np.asarray(jax.random.normal(key, tuple(shape), jnp.float32))


def _sampler(sd3: SD3, steps: int, guidance: float, sharding=None, param_shardings=None):
  """jit(params, vae params, noise, cond, null cond) -> (latents, images); with a
  sharding_lib.ShardingContext the batch is split over its devices and the parameters as
  ``param_shardings`` (MM-DiT, VAE) say."""
  ts = flow.diffusers_flow_match_grid(steps, sd3.shift, sd3.num_train_timesteps)

  def fn(mmdit_params, vae_params, noise, cond, null_cond):
    latents = sample_latents(sd3.mmdit, mmdit_params, noise, cond, null_cond, ts, guidance)
    return latents, decode(sd3.vae, vae_params, latents)
  if sharding is None:
    return jax.jit(fn)
  return sharding.jit(fn, in_shardings=param_shardings + (sharding.batch(),) * 3,
                      out_shardings=sharding.batch())


def sd3_shardings(sd3: SD3, sharding):
  """(MM-DiT, VAE) parameter shardings: logical names for the MM-DiT, shapes for the VAE."""
  from fgm_jax.models import mmdit
  boxed = mmdit.abstract_variables(sd3.mmdit, height=2 * sd3.mmdit.patch_size,
                                   width=2 * sd3.mmdit.patch_size)["params"]
  return sharding.shardings(boxed), sharding.shardings(sd3.vae_params)


def _conditioning(config, sd3, mesh):
  """(prompt texts, encode(indices) -> (context, pooled), null pair) from a prompt file
  (encoded here, sharded over the mesh) or from a prompt cache (config.prompts naming a cache
  folder: no text encoder runs)."""
  from fgm_jax import sharding as sharding_lib
  from fgm_jax.sd3 import prompt_cache
  if prompt_cache.is_cache(config.prompts):
    prompt_cache.require_settings(config.prompts, sd3.encoders.settings())
    rows, uncond = prompt_cache.load(config.prompts)
    as_f32 = lambda d, idx=slice(None): (np.asarray(d["context"][idx], np.float32),
                                         np.asarray(d["pooled"][idx], np.float32))
    return (prompt_cache.texts(config.prompts), lambda idx: as_f32(rows, idx), as_f32(uncond))
  prompts = prompt_cache.read_prompts(config.prompts)
  encode_ids = prompt_cache.sharded_encoder(sd3.encoders, mesh)

  def encode(texts):  # len(texts) is a multiple of the data-parallel devices
    return tuple(np.asarray(a) for a in encode_ids(text.tokenize(sd3.encoders, texts)))

  context, pooled = encode([""] * sharding_lib.batch_device_count(mesh))
  return prompts, lambda idx: encode([prompts[i] for i in idx]), (context[:1], pooled[:1])


def _generate(fn, params, cond, null, seed, noise_ids, shape):
  """Decoded images in [0, 1] (numpy) of conditioning rows ``cond`` from the noise of
  ``noise_ids``; ``null`` (the empty prompt's context, pooled) is repeated for every row."""
  noise = np.stack([initial_noise(seed, j, shape) for j in noise_ids])
  rows = len(noise_ids)
  null_cond = {"context": np.repeat(null[0], rows, 0), "pooled": np.repeat(null[1], rows, 0)}
  _, x = fn(*params, noise, cond, null_cond)
  return np.asarray(x)


def _setup(config, mesh, mmdit_params=None, sharding=None):
  """(sd3, mesh, placed (MM-DiT, VAE) params, jitted sampler, latent shape) for
  config.sample; ``mmdit_params`` replaces the folder's MM-DiT (a distilled generator).
  ``sharding``: the ShardingContext of the run that trained those weights (its mesh and
  rules); a folder sampled on its own builds one from config.mesh."""
  from fgm_jax import models
  from fgm_jax import sharding as sharding_lib
  from fgm_jax.models import mmdit
  s = config.sample
  sd3 = load(config.sd3.folder, config.sd3.t5_length, config.sd3.dtype)
  if sharding is None:
    mesh = mesh or sharding_lib.mesh_from_config(config.mesh)
    model = ml_collections.ConfigDict(dict(name="mmdit"))  # the rules are the MM-DiT's
    sharding = sharding_lib.ShardingContext(mesh, models.sharding_rules(config.mesh, model))
  mesh = sharding.mesh
  down = sd3.latent_downscale
  shape = (s.height // down, s.width // down, sd3.mmdit.in_channels)
  param_shardings = sd3_shardings(sd3, sharding)
  # A generator trained with another config.model.scan_layers comes in the other layout.
  mmdit_params = (sd3.mmdit_params if mmdit_params is None
                  else mmdit.to_layout(mmdit_params, sd3.mmdit))
  # Placed once: the weights stay on the devices for every batch.
  params = jax.device_put((mmdit_params, sd3.vae_params), param_shardings)
  fn = _sampler(sd3, s.steps, s.guidance, sharding, param_shardings)
  return sd3, mesh, params, fn, shape


def run(config, workdir, mesh=None, mmdit_params=None, sharding=None):
  """job=sample for an SD3 config: <workdir>/images/<index>_seed<seed>.png and grid.png.

  Prompts come from a file (encoded here) or a prompt cache; each batch is padded to a
  multiple of the data-parallel devices and split over them. ``mmdit_params``: sample with
  these MM-DiT weights instead of the folder's (a distilled one-step generator).
  """
  from fgm_jax import sharding as sharding_lib
  from fgm_jax import paths
  from fgm_jax.evaluation import plots
  from fgm_jax.sd3 import tiny
  config = tiny.resolve(config, workdir)
  s = config.sample
  sd3, mesh, params, fn, shape = _setup(config, mesh, mmdit_params, sharding)
  prompts, encode, null = _conditioning(config, sd3, mesh)
  prompts = prompts[:s.num or None]
  multiple = sharding_lib.batch_device_count(mesh)
  out_dir = os.path.join(workdir, "images")
  paths.makedirs(out_dir)  # a disk or a gs:// bucket (plots.save_png writes through paths)
  start, images = time.time(), []
  for i in range(0, len(prompts), s.batch_size):
    idx = list(range(i, min(len(prompts), i + s.batch_size)))
    n = len(idx)
    padded = idx + [idx[-1]] * ((-n) % multiple)  # repeat the last row; trimmed below
    context, pooled = encode(padded)
    x = _generate(fn, params, {"context": context, "pooled": pooled}, null, s.seed, padded,
                  shape)[:n]
    for j, k in enumerate(idx):
      plots.save_png(os.path.join(out_dir, f"{k:05d}_seed{s.seed}.png"),
                     (x[j] * 255).round().astype(np.uint8))
    images.append(x)
    done = idx[-1] + 1
    rate = done / (time.time() - start)
    logging.info("sd3 sample: %d/%d images, %.2f images/s, ETA %.0f s", done, len(prompts),
                 rate, (len(prompts) - done) / rate)
  grid = plots.image_grid(np.concatenate(images)[:plots.GRID_IMAGES] * 2 - 1)
  plots.save_png(os.path.join(workdir, "grid.png"), grid)
  elapsed = time.time() - start
  print(f"wrote {len(prompts)} images to {out_dir} and {os.path.join(workdir, 'grid.png')} "
        f"({len(prompts) / elapsed:.2f} images/s, compilation included)")
  return out_dir


def geneval_metadata(path: str, num: int):
  """GenEval's prompts from ``path``, refusing a config.sample.num that would cut them short:
  GenEval's score is over all of them, and a subset would pass for it."""
  from fgm_jax import config_checks
  from fgm_jax.evaluation import geneval as geneval_lib
  metadata = geneval_lib.read_metadata(path)
  if 0 < num < len(metadata):
    raise config_checks.ConfigError(
        f"config.sample.num={num} would keep only the first {num} of the {len(metadata)} "
        f"prompts of config.sample.geneval={path!r}, and GenEval scores all of them; set "
        "--config.sample.num=0 (for a partial run, give a metadata file of just those lines).")
  return metadata


def geneval(config, workdir, metadata_path, mesh=None, mmdit_params=None, sharding=None):
  """GenEval's folder layout under <workdir>/geneval: config.sample.images_per_prompt images
  per prompt of ``metadata_path``, prompts encoded here, resumable (evaluation/geneval.py)."""
  from fgm_jax import sharding as sharding_lib
  from fgm_jax.evaluation import geneval as geneval_lib
  from fgm_jax.sd3 import prompt_cache
  s = config.sample
  metadata = geneval_metadata(metadata_path, s.num)
  sd3, mesh, params, fn, shape = _setup(config, mesh, mmdit_params, sharding)
  encode_ids = prompt_cache.sharded_encoder(sd3.encoders, mesh)
  multiple = sharding_lib.batch_device_count(mesh)
  batch = -(-s.batch_size // multiple) * multiple  # one compiled shape, split evenly
  null = tuple(np.asarray(a)[:1] for a in encode_ids(text.tokenize(sd3.encoders,
                                                                   [""] * multiple)))

  def sample_fn(prompts, noise_ids):
    context, pooled = (np.asarray(a) for a in encode_ids(text.tokenize(sd3.encoders, prompts)))
    return _generate(fn, params, {"context": context, "pooled": pooled}, null, s.seed,
                     noise_ids, shape)

  out_dir = os.path.join(workdir, "geneval")
  summary = geneval_lib.write_images(
      metadata, out_dir, sample_fn, images_per_prompt=s.images_per_prompt, batch_size=batch,
      seed=s.seed, process_index=jax.process_index(), process_count=jax.process_count(),
      settings={"folder": os.path.abspath(config.sd3.folder), "steps": s.steps,
                "guidance": s.guidance, "height": s.height, "width": s.width})
  print(f"GenEval images in {out_dir}: {summary}")
  return out_dir
