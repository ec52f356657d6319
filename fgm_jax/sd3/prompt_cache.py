"""job=prompt_cache: SD3 prompt embeddings for a prompt file, encoded on all devices, in shards.

    python -m fgm_jax.main --config=configs/sd3_prompts.py --workdir=runs/prompts \\
        --config.sd3.folder=<stable-diffusion-3-medium-diffusers> --config.prompts=prompts.txt

Writes into --workdir

    cache.json                    settings the embeddings depend on (encoders, T5 length, dtype,
                                  the prompt file's hash, folder_identity: sha256 of the SD3
                                  folder's text-encoder configs and tokenizer files), the
                                  shard size and the count
    shard-00000.npz ...           per shard: context (bfloat16 bits as uint16), pooled (float32),
                                  prompt (text), index (row in the prompt file)
    uncond.npz                    the empty prompt's context / pooled (the CFG negative)

Every file goes through fgm_jax/paths.py, so --workdir may be a gs:// bucket. A shard is
written whole (locally under a temporary name, renamed when complete; a bucket object appears
only once uploaded), so a killed writer leaves no half shard; a restart skips the finished ones and gives the same files as an
uninterrupted run. A workdir holding a cache made with other settings is refused.
SD3 has no text mask, so every one of the 77 + t5_length positions is stored: print the size
before writing; for large prompt sets encode on the fly instead (text.encode_ids is pure).
"""

import functools
import hashlib
import io
import json
import os
import time

import jax
import ml_dtypes
import numpy as np
from absl import logging

from fgm_jax import checkpoint
from fgm_jax import config_checks
from fgm_jax import sharding as sharding_lib
from fgm_jax import paths
from fgm_jax.sd3 import text

MANIFEST = "cache.json"
UNCOND = "uncond.npz"
FORMAT = "fgm_jax.sd3_prompt_cache/1"
IDENTITY = "folder_identity"  # text.folder_identity(): absent in caches of older versions


class PromptFileError(FileNotFoundError):
  """A missing or empty prompt file."""


def read_prompts(path: str):
  """Prompts from a text file (one per line) or JSONL (a 'prompt' field per line)."""
  if not path or not paths.is_file(path):
    raise PromptFileError(f"config.prompts={path!r}: no such prompt file; give a text file "
                          "with one prompt per line, or JSONL with a 'prompt' field.")
  # newline=None: the lines open() would give, from a disk or a bucket.
  f = io.StringIO(paths.read_bytes(path).decode("utf-8"), newline=None)
  lines = [line.rstrip("\n") for line in f if line.strip()]
  if path.endswith(".jsonl"):
    lines = [json.loads(line)["prompt"] for line in lines]
  if not lines:
    raise PromptFileError(f"config.prompts={path!r} holds no prompts.")
  return lines


def shard_name(k: int) -> str:
  return f"shard-{k:05d}.npz"


def bytes_per_prompt(encoders: text.TextEncoders) -> int:
  """Stored bytes of one prompt: bf16 context of every position, fp32 pooled."""
  length = encoders.clip_length + encoders.t5_length
  pooled = (encoders.clip_l.module.projection_dim + encoders.clip_g.module.projection_dim)
  return 2 * length * encoders.joint_dim + 4 * pooled


def settings(config, encoders, prompts) -> dict:
  digest = hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()
  return {"format": FORMAT, "folder": os.path.abspath(config.sd3.folder),
          "dtype": config.sd3.dtype, "prompts_sha256": digest, "num_prompts": len(prompts),
          "shard_size": int(config.shard_size), **encoders.settings()}


def _difference(key, saved, wanted, here: str) -> str:
  if saved is None and isinstance(wanted, dict):  # a cache of an older version
    return f"{key}: not recorded there"
  if isinstance(saved, dict) and isinstance(wanted, dict):  # folder_identity: name the parts
    parts = sorted(p for p in set(saved) | set(wanted) if saved.get(p) != wanted.get(p))
    return f"{key}: {' and '.join(parts)} differ"
  return f"{key}: {saved!r} there, {wanted!r} {here}"


def _differences(saved: dict, wanted: dict, keys, here: str) -> str:
  """'k: <saved> there, <wanted> <here>, ...' for the keys whose values differ ('' if none)."""
  return ", ".join(_difference(k, saved.get(k), wanted.get(k), here)
                   for k in sorted(keys) if saved.get(k) != wanted.get(k))


def _check_workdir(workdir, wanted):
  path = os.path.join(workdir, MANIFEST)
  if not paths.is_file(path):
    return
  saved = paths.read_json(path)["settings"]
  diff = _differences(saved, wanted, set(saved) | set(wanted), "now")
  if diff:
    raise config_checks.ConfigError(
        f"--workdir={workdir} holds a prompt cache made with other settings ({diff}); use a "
        "new --workdir.")


def read_manifest(cache_dir: str) -> dict:
  path = os.path.join(cache_dir, MANIFEST)
  if not paths.is_file(path):
    raise FileNotFoundError(f"{cache_dir} is not a prompt cache (no {MANIFEST}); write one with "
                            "--config=configs/sd3_prompts.py.")
  return paths.read_json(path)


def is_cache(path: str) -> bool:
  return bool(path) and paths.is_file(os.path.join(path, MANIFEST))


def has_uncond(cache_dir: str) -> bool:
  """Whether the cache holds the empty prompt's embedding (written after the shards)."""
  return paths.is_file(os.path.join(cache_dir, UNCOND))


def require_settings(cache_dir: str, wanted: dict, field: str = "config.prompts"):
  """Stops when a cache was made with other settings than ``wanted`` (TextEncoders.settings()
  or text.folder_settings(): T5 length, context width, with or without T5, which text encoders
  and tokenizers): its embeddings would not be what the model expects. The one check of
  job=sample, the teacher sampler and distillation (``field`` names the config entry).

  A cache written before folder_identity was recorded is accepted with a warning, its other
  settings still checked: nothing says it is wrong, and re-encoding costs hours at scale.
  """
  saved = read_manifest(cache_dir)["settings"]
  keys = set(wanted)
  if IDENTITY not in saved and IDENTITY in keys:
    keys.discard(IDENTITY)
    logging.warning("%s=%r records no %s (written by an older fgm_jax): it cannot be checked "
                    "to come from this SD3 folder's text encoders; rebuild it to have that "
                    "checked.", field, cache_dir, IDENTITY)
  diff = _differences(saved, wanted, keys, "here")
  if diff:
    raise config_checks.ConfigError(
        f"{field}={cache_dir!r}: the prompt cache was made with other settings ({diff}); "
        "rebuild it with configs/sd3_prompts.py from this config.sd3.folder and these "
        f"settings, or point {field} at a matching cache.")


def texts(cache_dir: str):
  """The prompts of a complete cache, in file order."""
  manifest = read_manifest(cache_dir)
  out = []
  for k in range(manifest["num_shards"]):
    # Only the texts: the embeddings (most of a shard) are not read.
    z = paths.load_npz(os.path.join(cache_dir, shard_name(k)), keys=["prompt"])
    out += [str(p) for p in z["prompt"]]
  return out


def sharded_encoder(encoders, mesh):
  """Global-batch encoder: ids split over the batch axes, parameters by the encoders' rules."""
  from fgm_jax.models import clip, t5
  rules = tuple(dict.fromkeys(clip.LOGICAL_RULES + t5.LOGICAL_RULES))
  ctx = sharding_lib.ShardingContext(mesh, rules)
  modules, params = text.modules_and_params(encoders)
  abstract = tuple(None if m is None else
                   (clip.abstract_variables(m) if isinstance(m, clip.CLIPTextModel)
                    else t5.abstract_variables(m))["params"] for m in modules)
  param_shardings = ctx.shardings(abstract)
  params = jax.device_put(params, param_shardings)
  fn = ctx.jit(functools.partial(text.encode_ids, modules, t5_length=encoders.t5_length,
                                 joint_dim=encoders.joint_dim),
               in_shardings=(param_shardings, ctx.batch()), out_shardings=ctx.batch())
  return lambda ids: fn(params, ids)


def _encode_all(encode, encoders, prompts, batch_size):
  """(context bf16 bits, pooled fp32) numpy arrays for ``prompts``, in padded global batches."""
  contexts, pooled = [], []
  for i in range(0, len(prompts), batch_size):
    chunk = list(prompts[i:i + batch_size])
    real = len(chunk)
    chunk += [""] * (batch_size - real)  # a fixed batch shape: one compilation
    c, p = encode(text.tokenize(encoders, chunk))
    if jax.process_count() > 1:  # every process gets the whole batch; process 0 writes it
      from jax.experimental import multihost_utils
      c, p = (multihost_utils.process_allgather(x, tiled=True) for x in (c, p))
    contexts.append(np.asarray(c[:real]).astype(ml_dtypes.bfloat16).view(np.uint16))
    pooled.append(np.asarray(p[:real], np.float32))
  return np.concatenate(contexts), np.concatenate(pooled)


def _drop_temporaries(workdir):
  """Removes the half shards a killed writer left (.<name>.<pid>.tmp, paths.write_bytes; a
  shard can be gigabytes). None in a bucket: objects appear only once uploaded."""
  if paths.is_remote(workdir):
    return
  for name in paths.listdir(workdir):
    if name.startswith(".shard-") and name.endswith(".tmp"):
      paths.remove(os.path.join(workdir, name))


def write(config, workdir, mesh=None):
  """Encodes config.prompts into ``workdir``; resumes a killed run. Returns the manifest."""
  from fgm_jax.sd3 import tiny
  config = tiny.resolve(config, workdir)
  prompts = read_prompts(config.prompts)
  encoders = text.load(config.sd3.folder, t5_length=config.sd3.t5_length,
                       dtype=config.sd3.dtype)
  wanted = settings(config, encoders, prompts)
  _check_workdir(workdir, wanted)
  paths.makedirs(workdir)
  if jax.process_index() == 0:
    _drop_temporaries(workdir)
  per_prompt = bytes_per_prompt(encoders)
  print(f"prompt cache: {len(prompts):,} prompts x {per_prompt / 1e6:.2f} MB "
        f"({encoders.clip_length} + {encoders.t5_length} tokens x {encoders.joint_dim}, "
        "bf16) = "
        f"{len(prompts) * per_prompt / 1e9:.2f} GB in {workdir}", flush=True)
  if jax.process_index() == 0:
    checkpoint.write_json(os.path.join(workdir, MANIFEST),
                          {"settings": wanted, "complete": False})
  encode = sharded_encoder(encoders, mesh or sharding_lib.mesh_from_config(config.mesh))
  size = int(config.shard_size)
  num_shards = -(-len(prompts) // size)
  start, done = time.time(), 0
  for k in range(num_shards):
    path = os.path.join(workdir, shard_name(k))
    if paths.is_file(path):
      continue  # finished by an earlier run (a shard appears only once whole)
    rows = range(k * size, min(len(prompts), (k + 1) * size))
    shard = [prompts[i] for i in rows]
    ctx, pooled = _encode_all(encode, encoders, shard, config.batch_size)
    if jax.process_index() == 0:
      paths.save_npz(path, context=ctx, pooled=pooled, prompt=np.array(shard),
            index=np.array(list(rows), np.int64))
    done += len(rows)
    rate = done / max(time.time() - start, 1e-9)
    left = len(prompts) - rows.stop  # the prompts of the shards after this one
    logging.info("prompt cache: shard %d/%d, %.1f prompts/s, ETA %.0f s", k + 1, num_shards,
                 rate, left / max(rate, 1e-9))
  uncond_ctx, uncond_pooled = _encode_all(encode, encoders, [""], config.batch_size)
  if jax.process_index() == 0:
    paths.save_npz(os.path.join(workdir, UNCOND), context=uncond_ctx, pooled=uncond_pooled)
    checkpoint.write_json(os.path.join(workdir, MANIFEST),
                          {"settings": wanted, "complete": True, "num_shards": num_shards})
  print(f"prompt cache complete: {num_shards} shards in {workdir}", flush=True)
  return read_manifest(workdir)


def load(cache_dir: str):
  """(rows, uncond): {'context' (N, L, D) bfloat16, 'pooled' (N, P) float32} for every prompt
  in file order, and the unconditional pair; for data.arrays.RowSource in conditional runs."""
  manifest = read_manifest(cache_dir)
  if not manifest.get("complete"):
    raise FileNotFoundError(f"{cache_dir}: the prompt cache is not complete; rerun the "
                            "prompt_cache job on it to finish it.")
  parts = [paths.load_npz(os.path.join(cache_dir, shard_name(k)))
           for k in range(manifest["num_shards"])]
  rows = {"context": np.concatenate([p["context"] for p in parts]).view(ml_dtypes.bfloat16),
          "pooled": np.concatenate([p["pooled"] for p in parts])}
  u = paths.load_npz(os.path.join(cache_dir, UNCOND))
  uncond = {"context": u["context"].view(ml_dtypes.bfloat16), "pooled": u["pooled"]}
  return rows, uncond
