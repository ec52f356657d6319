"""SD3 prompt encoding in JAX, identical to diffusers' ``StableDiffusion3Pipeline.encode_prompt``.

From a local SD3 diffusers folder (``text_encoder/`` CLIP-L, ``text_encoder_2/`` CLIP-G,
``text_encoder_3/`` T5, ``tokenizer*/``):

    context (B, 77 + t5_length, joint_dim) =
        concat_tokens( pad_to(joint_dim, concat_channels(CLIP-L[-2], CLIP-G[-2])), T5 )
    pooled  (B, proj_L + proj_G) = concat(CLIP-L text_embeds, CLIP-G text_embeds)

where ``[-2]`` is each CLIP's penultimate hidden state (SD3 uses no clip skip) and T5 reads
``t5_length`` tokens (256 as diffusers' default). Without ``text_encoder_3`` the T5 part is
zeros, as in diffusers. The unconditional (negative) embedding is the empty prompt's.

Tokenisation uses the folder's own tokenizers through transformers (no torch needed); the
encoders are our Flax ports (models/clip.py, models/t5.py), so ``encode_ids`` is a pure
function that jits and shards like everything else.
"""

import dataclasses
import hashlib
import json
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

CLIP_SUBFOLDERS = ("text_encoder", "text_encoder_2")
T5_SUBFOLDER = "text_encoder_3"
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
DEFAULT_T5_LENGTH = 256


class SD3FolderError(FileNotFoundError):
  """An SD3 folder without a part that is needed; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class Encoder:
  """A Flax text encoder with its parameters."""
  module: Any
  params: Any


@dataclasses.dataclass(frozen=True)
class TextEncoders:
  clip_l: Encoder
  clip_g: Encoder
  t5: Optional[Encoder]  # None: the folder has no text_encoder_3 (zeros, as diffusers)
  tokenizers: tuple  # (CLIP-L, CLIP-G, T5 or None), transformers tokenizers
  clip_length: int  # tokens per CLIP prompt (the CLIP-L tokenizer's model_max_length: 77)
  t5_length: int
  joint_dim: int  # the MM-DiT's context width (T5's d_model when present)
  folder: str  # the SD3 folder they were loaded from

  def settings(self) -> dict:
    """What the embeddings depend on besides the prompts (recorded with a cache)."""
    return {"clip_length": self.clip_length, **folder_settings(self.folder, self.t5_length)}


def folder_settings(folder: str, t5_length: int) -> dict:
  """What a prompt's embedding depends on besides its text and the CLIP length, read from the
  folder's small files only: T5 length, context width, with or without T5, and which text
  encoders and tokenizers (``folder_identity``). Distillation compares a prompt cache with
  these without loading an encoder."""
  return {"t5_length": int(t5_length), "joint_dim": _joint_dim(folder),
          "t5": os.path.isdir(os.path.join(folder, T5_SUBFOLDER)),
          "folder_identity": folder_identity(folder)}


def _joint_dim(folder: str) -> int:
  with open(os.path.join(folder, "transformer", "config.json")) as f:
    return int(json.load(f).get("joint_attention_dim", 4096))


# JSON keys that change when a folder is saved again or moved, not when its model changes.
_VOLATILE_KEYS = ("_name_or_path", "name_or_path", "transformers_version", "_commit_hash")


def _file_bytes(path: str) -> bytes:
  """A file's bytes; a JSON file's canonically (sorted keys, no _VOLATILE_KEYS), so that
  re-saving a folder with another transformers version keeps its identity."""
  with open(path, "rb") as f:
    data = f.read()
  if not path.endswith(".json"):
    return data
  try:
    obj = json.loads(data)
  except ValueError:
    return data
  if isinstance(obj, dict):
    obj = {k: v for k, v in obj.items() if k not in _VOLATILE_KEYS}
  return json.dumps(obj, sort_keys=True).encode("utf-8")


def folder_identity(folder: str) -> dict:
  """{part: sha256} of each text encoder's config.json and each tokenizer's files: which
  model a prompt cache's embeddings come from, beyond their widths. Weights are not hashed
  (gigabytes to read at every start), so two folders that differ only in encoder weights
  look alike. Parts the folder lacks (text_encoder_3 / tokenizer_3) are left out."""
  out = {}
  for part in CLIP_SUBFOLDERS + (T5_SUBFOLDER,) + TOKENIZERS:
    d = os.path.join(folder, part)
    if not os.path.isdir(d):
      continue
    names = (["config.json"] if part in CLIP_SUBFOLDERS + (T5_SUBFOLDER,)
             else sorted(n for n in os.listdir(d) if not n.startswith(".")))
    digest = hashlib.sha256()
    for name in names:
      path = os.path.join(d, name)
      if os.path.isfile(path):
        digest.update(name.encode("utf-8") + b"\0" + hashlib.sha256(_file_bytes(path)).digest())
    out[part] = digest.hexdigest()
  return out


def require_part(path: str, what: str):
  if not os.path.exists(path):
    raise SD3FolderError(
        f"{path} is missing: an SD3 diffusers folder needs {what} (the layout of "
        "stabilityai/stable-diffusion-3-medium-diffusers). Point the config at the whole "
        "folder, downloaded with its text encoders and tokenizers.")


def load_tokenizer(folder: str):
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(folder)


def _load_encoder(folder: str, kind: str, dtype) -> Encoder:
  from fgm_jax.convert import transformers_folder
  from fgm_jax.models import clip, t5
  config, params = transformers_folder.load_params(folder, kind)
  build = clip.from_transformers_config if kind == "clip_text" else t5.from_transformers_config
  return Encoder(build(config, dtype=dtype), params)


def load(folder: str, t5_length: int = DEFAULT_T5_LENGTH, dtype=jnp.float32) -> TextEncoders:
  """The text encoders and tokenizers of an SD3 folder; clear errors for missing parts."""
  dtype = jnp.dtype(dtype)  # 'float32' / 'bfloat16' from a config, or a jnp type
  require_part(folder, "a folder")
  for sub, what in ((CLIP_SUBFOLDERS[0], "CLIP-L"), (CLIP_SUBFOLDERS[1], "CLIP-G"),
                    (TOKENIZERS[0], "the CLIP-L tokenizer"),
                    (TOKENIZERS[1], "the CLIP-G tokenizer"),
                    ("transformer", "the MM-DiT (its config.json gives the context width)")):
    require_part(os.path.join(folder, sub), f"{sub}/ ({what})")
  has_t5 = os.path.isdir(os.path.join(folder, T5_SUBFOLDER))
  if has_t5:
    require_part(os.path.join(folder, TOKENIZERS[2]), f"{TOKENIZERS[2]}/ (the T5 tokenizer)")
  joint_dim = _joint_dim(folder)
  tokenizers = tuple(load_tokenizer(os.path.join(folder, t)) for t in TOKENIZERS[:2]) + (
      load_tokenizer(os.path.join(folder, TOKENIZERS[2])) if has_t5 else None,)
  t5 = _load_encoder(os.path.join(folder, T5_SUBFOLDER), "t5_encoder", dtype) if has_t5 else None
  return TextEncoders(
      clip_l=_load_encoder(os.path.join(folder, CLIP_SUBFOLDERS[0]), "clip_text", dtype),
      clip_g=_load_encoder(os.path.join(folder, CLIP_SUBFOLDERS[1]), "clip_text", dtype),
      t5=t5, tokenizers=tokenizers, clip_length=int(tokenizers[0].model_max_length),
      t5_length=int(t5_length), joint_dim=joint_dim, folder=folder)


def _token_ids(tokenizer, prompts, length):
  """(ids (B, length) int32, how many prompts were cut), padded and truncated as diffusers."""
  ids = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                  return_tensors="np").input_ids
  full = tokenizer(list(prompts), padding="longest", return_tensors="np")
  cut = int(np.sum(full.attention_mask.sum(-1) > length))
  return ids.astype(np.int32), cut


def tokenize(encoders: TextEncoders, prompts: Sequence[str]):
  """{'clip_l', 'clip_g', 't5'} token ids for a list of prompts; over-long prompts are
  truncated as diffusers does, and counted in the log."""
  tok_l, tok_g, tok_t5 = encoders.tokenizers
  out, cuts = {}, {}
  out["clip_l"], cuts["CLIP-L"] = _token_ids(tok_l, prompts, encoders.clip_length)
  out["clip_g"], cuts["CLIP-G"] = _token_ids(tok_g, prompts, encoders.clip_length)
  if tok_t5 is not None:
    out["t5"], cuts["T5"] = _token_ids(tok_t5, prompts, encoders.t5_length)
  for name, n in cuts.items():
    if n:
      logging.warning("%d of %d prompts were longer than %s's %d tokens and were truncated.",
                      n, len(prompts), name, encoders.t5_length if name == "T5"
                      else encoders.clip_length)
  return out


def encode_ids(modules, params, ids, *, t5_length, joint_dim):
  """(context, pooled) from token ids; pure in ``params`` = (clip_l, clip_g, t5 or None).

  ``modules`` = (CLIP-L, CLIP-G, T5 or None) Linen modules (static under jit).
  """
  (m_l, m_g, m_t5), (p_l, p_g, p_t5) = modules, params
  out_l = m_l.apply({"params": p_l}, ids["clip_l"])
  out_g = m_g.apply({"params": p_g}, ids["clip_g"])
  clip = jnp.concatenate([out_l["hidden_states"][-2], out_g["hidden_states"][-2]], axis=-1)
  pooled = jnp.concatenate([out_l["text_embeds"], out_g["text_embeds"]], axis=-1)
  if m_t5 is None:
    t5 = jnp.zeros((clip.shape[0], t5_length, joint_dim), clip.dtype)
  else:
    t5 = m_t5.apply({"params": p_t5}, ids["t5"])
  clip = jnp.pad(clip, ((0, 0), (0, 0), (0, t5.shape[-1] - clip.shape[-1])))
  return jnp.concatenate([clip, t5.astype(clip.dtype)], axis=1), pooled


_encode_ids_jit = jax.jit(encode_ids, static_argnums=0,
                          static_argnames=("t5_length", "joint_dim"))


def modules_and_params(encoders: TextEncoders):
  t5 = encoders.t5
  return ((encoders.clip_l.module, encoders.clip_g.module, t5 and t5.module),
          (encoders.clip_l.params, encoders.clip_g.params, t5 and t5.params))


def encode_prompt(encoders: TextEncoders, prompts: Sequence[str]):
  """(context, pooled) numpy arrays for ``prompts``, as diffusers' encode_prompt gives for
  prompt=prompt_2=prompt_3; ``encode_prompt(encoders, [""])`` is the unconditional one."""
  ids = tokenize(encoders, prompts)
  modules, params = modules_and_params(encoders)
  context, pooled = _encode_ids_jit(modules, params, ids, t5_length=encoders.t5_length,
                                    joint_dim=encoders.joint_dim)
  return np.asarray(context), np.asarray(pooled)
