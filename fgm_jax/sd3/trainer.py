"""MM-DiT-FGM: SD3's MM-DiT distilled by FGM into a one-step text-to-image generator.

    python -m fgm_jax.main --config=configs/sd3_fgm.py --workdir=runs/sd3_fgm \\
        --config.sd3.folder=stable-diffusion-3-medium-diffusers \\
        --config.prompt_cache=runs/prompts          # written by configs/sd3_prompts.py

The same FGM step as every other run (train/steps.fgm_step), with conditioning:

  * each iteration draws a global batch of prompt embeddings from the cache, keyed by step
    (data.arrays.RowSource), so a resumed run sees the same prompts;
  * the teacher is the folder's MM-DiT, frozen (held in ``config.fgm.teacher_dtype``) and
    guided: v(x, t, null) + w (v(x, t, c) - v(x, t, null)), the null embedding from the cache;
  * generator and online flow start as copies of it; the generator is one Euler step of
    diffusers' scheduler from sigma = 1 to 0: x0 = z - v_theta(z, 1, c) (t* = 1), in latents.

This module fills the architecture in from the folder (``prepare``) and builds the trainer
(``build_trainer``), checking the inputs first: a cache made with other settings than the
folder's (T5 length, with or without T5, other text encoders or tokenizers: the check of
job=sample, prompt_cache.require_settings), a cache whose embedding widths differ from the
MM-DiT's, one without the unconditional embedding, an empty cache, a teacher folder of another
model -- one line each, before anything compiles.
"""

import json
import os

import ml_collections
import numpy as np

from fgm_jax import config_checks
from fgm_jax.sd3 import text
from fgm_jax.sd3 import tiny
from fgm_jax.train import trainers

TRANSFORMER_CLASS = "SD3Transformer2DModel"
PIPELINE_CLASS = "StableDiffusion3Pipeline"


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def transformer_json(folder: str) -> dict:
  """The folder's transformer/config.json, after checking that it is an SD3 MM-DiT."""
  text.require_part(os.path.join(folder, "transformer", "config.json"), "transformer/")
  index = os.path.join(folder, "model_index.json")
  if os.path.isfile(index):
    pipeline = _read_json(index).get("_class_name")
    if pipeline != PIPELINE_CLASS:
      raise config_checks.ConfigError(
          f"config.sd3.folder={folder!r} is a {pipeline} folder, not an SD3 one "
          f"({PIPELINE_CLASS}); point it at stable-diffusion-3-medium-diffusers or another "
          "SD3 folder.")
  config_json = _read_json(os.path.join(folder, "transformer", "config.json"))
  if config_json.get("_class_name") != TRANSFORMER_CLASS:
    raise config_checks.ConfigError(
        f"config.sd3.folder={folder!r}: transformer/ holds a "
        f"{config_json.get('_class_name')}, not an "
        f"{TRANSFORMER_CLASS}; FGM here distils SD3's MM-DiT.")
  return config_json


def _architecture(transformer_json: dict) -> dict:
  from fgm_jax.models import mmdit
  return {k: (list(v) if isinstance(v, tuple) else v)
          for k, v in ((k, transformer_json.get(k, d))
                       for k, d in mmdit.DIFFUSERS_DEFAULTS.items())}


def latent_downscale(folder: str) -> int:
  """Image pixels per latent pixel of the folder's VAE (8 for SD3's)."""
  from fgm_jax.models import vae
  text.require_part(os.path.join(folder, "vae", "config.json"), "vae/")
  return vae.downscale(_read_json(os.path.join(folder, "vae", "config.json"))["block_out_channels"])


def runlocal_cache(config, workdir) -> str:
  """A prompt cache of the tiny folder's prompts in <workdir>/prompt_cache (:runlocal)."""
  from fgm_jax.sd3 import prompt_cache
  cache_dir = os.path.join(workdir, "prompt_cache")
  if prompt_cache.is_cache(cache_dir) and prompt_cache.read_manifest(cache_dir).get("complete"):
    return cache_dir
  c = ml_collections.ConfigDict(dict(job="prompt_cache", seed=config.seed,
                                     mesh=config.mesh.to_dict(), sd3=config.sd3.to_dict(),
                                     prompts=config.prompts, batch_size=8, shard_size=2))
  prompt_cache.write(c, cache_dir)
  return cache_dir


def prepare(config, workdir):
  """The config with the folder's architecture in ``teacher.model`` and the latent shape in
  ``teacher.latent_shape``; a ':runlocal' config also gets its tiny folder and prompt cache
  built."""
  c = prepare_architecture(config, workdir)
  if not c.prompt_cache and c.sd3.tiny_random:
    c.prompt_cache = runlocal_cache(c, workdir)
  return c


# Latent downscale of the built-in architectures' VAE (mmdit.ARCHITECTURES; SD3's VAE: 8).
BUILT_IN_DOWNSCALE = 8


def prepare_architecture(config, workdir):
  """``prepare`` without the prompt cache: the architecture from config.aot.architecture (a
  built-in name, job=compile) or from the folder's config.json files."""
  c = config.copy_and_resolve_references()
  name = c.aot.architecture if "aot" in c else None
  if name:  # checked by config_checks
    from fgm_jax.models import mmdit
    arch, down = _architecture(mmdit.ARCHITECTURES[name]), BUILT_IN_DOWNSCALE
  else:
    c = tiny.resolve(c, workdir).copy_and_resolve_references()
    arch = _architecture(transformer_json(c.sd3.folder))
    down = latent_downscale(c.sd3.folder)
  if "aot" in c and c.aot.num_layers:  # compile-time studies at other depths
    arch["num_layers"] = c.aot.num_layers
  with c.unlocked():
    c.teacher.model.update(arch)
    c.teacher.latent_shape = (c.resolution // down, c.resolution // down, arch["in_channels"])
  return c


class FolderTeacher:
  """The teacher as a source (trainers.CheckpointTeacher says what one gives): the MM-DiT of
  config.sd3.folder, guided with the cache's null embedding in the step. Latents have no
  data set here: FGM is data-free, and pictures come from job=sample."""

  def __init__(self, config):  # a prepared config: teacher.model and latent_shape are filled
    self.folder = config.sd3.folder
    self.model_config = config.teacher.model
    self.shape = tuple(config.teacher.latent_shape)
    self.sample = config.teacher.sample
    self.data_config, self.data_seed = None, config.seed

  def load(self, mesh):
    from fgm_jax.convert import diffusers as dconv
    from fgm_jax.models import mmdit
    del mesh  # host arrays; the trainer places them
    _, params = dconv.load_params(os.path.join(self.folder, "transformer"), "mmdit")
    # The folder loads scanned; config.teacher.model.scan_layers=False wants it unrolled.
    return mmdit.to_layout(params, mmdit.from_config(self.model_config))


# --- the prompt cache as conditioning --------------------------------------------------------


def load_conditioning(config):
  """(rows, null): the cache's embeddings {'context', 'pooled'} and the unconditional pair
  (leading axis 1), checked against the MM-DiT's widths."""
  from fgm_jax.sd3 import prompt_cache
  cache_dir = config.prompt_cache
  if not cache_dir:
    raise config_checks.ConfigError(
        "config.prompt_cache is not set; write one with --config=configs/sd3_prompts.py "
        "(same sd3.folder) and pass --config.prompt_cache=<its workdir>.")
  manifest = prompt_cache.read_manifest(cache_dir)
  # As job=sample does: a cache of a folder without T5, or of other text encoders, has the
  # same widths and would train silently on the wrong embeddings.
  prompt_cache.require_settings(
      cache_dir, text.folder_settings(config.sd3.folder, config.sd3.t5_length),
      "config.prompt_cache")
  if manifest.get("complete") and manifest.get("num_shards", 0) == 0:
    raise config_checks.ConfigError(f"config.prompt_cache={cache_dir!r} holds no prompts; "
                                    "rebuild it from a non-empty prompt file.")
  if not prompt_cache.has_uncond(cache_dir):  # on a disk or in a gs:// bucket
    raise FileNotFoundError(
        f"config.prompt_cache={cache_dir!r} has no {prompt_cache.UNCOND} (the empty prompt's "
        "embedding, the CFG negative); rerun the prompt_cache job on it to finish it.")
  rows, null = prompt_cache.load(cache_dir)
  if len(rows["context"]) == 0:
    raise config_checks.ConfigError(f"config.prompt_cache={cache_dir!r} holds no prompts; "
                                    "rebuild it from a non-empty prompt file.")
  model = config.teacher.model
  widths = {"context": (rows["context"].shape[-1], model.joint_attention_dim,
                        "joint_attention_dim"),
            "pooled": (rows["pooled"].shape[-1], model.pooled_projection_dim,
                       "pooled_projection_dim")}
  for name, (have, want, field) in widths.items():
    if have != want:
      raise config_checks.ConfigError(
          f"config.prompt_cache={cache_dir!r}: its {name} embeddings are {have} wide but the "
          f"MM-DiT of {config.sd3.folder!r} expects {field}={want}; build the cache from the "
          "same SD3 folder (configs/sd3_prompts.py).")
  null = {k: np.asarray(v[:1]) for k, v in null.items()}
  return rows, null


def build_trainer(config, mesh):
  """The FGMTrainer of an SD3 FGM run: teacher from the folder, prompts from the cache."""
  from fgm_jax.data import arrays
  rows, null = load_conditioning(config)
  return SD3FGMTrainer(config, mesh, source=FolderTeacher(config),
                           cond_source=arrays.RowSource(rows, config.seed),
                           null_cond=null if config.fgm.guidance != 1.0 else None)


def build_abstract(config, mesh):
  """job=compile: shapes only (no weights, no prompt cache)."""
  return SD3FGMTrainer(config, mesh, source=FolderTeacher(config))


class SD3FGMTrainer(trainers.FGMTrainer):
  """FGM on prompts; pictures come from job=sample (they need the VAE and the prompts)."""

  def samples(self, state, n, seed, weights="ema"):
    raise config_checks.ConfigError(
        "SD3 FGM runs draw images with --config.job=sample (prompts -> one step -> VAE); "
        "set config.log.plot_every=0 and config.eval.fid.every=0.")

  def sample_sets(self, state, n, seed, teacher_steps, weights="ema"):
    return self.samples(state, n, seed)

  # --- job=compile: prompt embeddings as the cache holds them (bf16 tokens, fp32 pooled)

  def _text_length(self):
    return tiny.CLIP_LENGTH + self.config.sd3.t5_length

  def _abstract_cond(self, batch, sharding=None):
    import jax
    import ml_dtypes
    m = self.config.teacher.model
    sharding = sharding or self.sharding.batch()
    return {"context": self._abstract((batch, self._text_length(), m.joint_attention_dim),
                                      ml_dtypes.bfloat16, sharding),
            "pooled": self._abstract((batch, m.pooled_projection_dim), jax.numpy.float32,
                                     sharding)}

  def _abstract_null(self):
    if self.config.fgm.guidance == 1.0:
      return None
    return self._abstract_cond(1, self.sharding.replicated())

  def _sampler_targets(self, params, sample_batch):
    """The teacher's multi-step CFG sampler (latents; the VAE decode is not compiled)."""
    from fgm_jax import flow
    from fgm_jax.sd3 import sampler
    s = self.teacher_sample
    ts = flow.diffusers_flow_match_grid(s.steps, s.shift)
    guidance = self.config.fgm.guidance

    def fn(params, z, cond, null):
      return sampler.sample_latents(self.model, params, z, cond, null, ts, guidance)
    batch = self.sharding.batch()
    name = f"teacher_cfg_{s.steps}step"
    jitted = self._jit(name, fn, in_shardings=(self.param_shardings,) + (batch,) * 3,
                       out_shardings=batch).jitted
    # The sampler repeats the empty prompt's embedding for every row (sampler._generate).
    cond = self._abstract_cond(sample_batch)
    return {name: (jitted, (params, self._abstract_noise(sample_batch), cond, cond))}

  def _generator_target(self, gen, sample_batch):
    """What job=sample runs per batch, before the VAE: x0 = z - v(z, 1, c)."""
    from fgm_jax import fgm
    from fgm_jax.train import steps
    t_star = self.config.fgm.t_star

    def one_step(params, z, cond):
      return fgm.generator_sample(steps.velocity_fn(self.model, params, cond=cond), z, t_star)
    batch = self.sharding.batch()
    jitted = self._jit("generator", one_step, in_shardings=(self.param_shardings, batch, batch),
                       out_shardings=batch).jitted
    return jitted, (gen, self._abstract_noise(sample_batch), self._abstract_cond(sample_batch))


# config.trainer = 'sd3_fgm' (train/kinds.py): the teacher is the folder's MM-DiT.
KIND = trainers.TrainerKind(build=build_trainer, build_abstract=build_abstract,
                            prepare=prepare, prepare_architecture=prepare_architecture)
