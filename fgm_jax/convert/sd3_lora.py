"""Our MM-DiT adapters (models/lora.py) <-> diffusers' SD3 LoRA file.

What ``StableDiffusion3Pipeline.load_lora_weights(path)`` loads (SD3LoraLoaderMixin, peft's
key layout; needs ``peft``, in the ``[diffusers]`` extra):

    transformer.<diffusers module>.lora_A.weight    (rank, in)     = A^T
    transformer.<diffusers module>.lora_B.weight    (out, rank)    = (s B)^T

e.g. ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``. The file stores no alphas,
so diffusers takes alpha = rank (scale 1): our scale s = alpha / rank is folded into lora_B.
Module names are mmdit_keys' (the unrolled layout): a scanned run is unstacked, and the padded
last block loses the adapters of the projections diffusers' last block does not have (their
B never leaves zero: that output is dropped).

A file is checked against the MM-DiT it is applied to (a folder's transformer/config.json):
a module it lacks, or other in/out widths, is a LoRA for another base -- one line, by name.
"""

import json
import os

import numpy as np

from fgm_jax.convert import common
from fgm_jax.convert import mmdit_keys

PREFIX = "transformer."
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what load_lora_weights(folder) looks for
_A, _B = ".lora_A.weight", ".lora_B.weight"


def _module_name(path):
  """Flax module path -> diffusers module name (its kernel's weight name without .weight)."""
  return mmdit_keys.torch_name(tuple(path) + ("kernel",))[:-len(".weight")]


def state_from_adapters(adapters, module, scale: float, dtype=np.float32) -> dict:
  """{key: array} of the LoRA file: ``adapters`` (scanned or unrolled, of ``module``'s
  architecture; numpy) with B scaled by ``scale``."""
  from fgm_jax.models import lora
  from fgm_jax.models import mmdit
  flat = common.flatten(mmdit.unstack_blocks(adapters, module))
  out = {}
  for path in sorted(p for p in flat if p[-1] == lora.A):
    name = PREFIX + _module_name(path[:-1])
    a, b = np.asarray(flat[path], np.float32), np.asarray(flat[path[:-1] + (lora.B,)],
                                                         np.float32)
    out[name + _A] = np.ascontiguousarray(a.T).astype(dtype)
    out[name + _B] = np.ascontiguousarray((scale * b).T).astype(dtype)
  return out


def save(path: str, state: dict):
  """Writes the LoRA file (a file path, or a folder: <folder>/pytorch_lora_weights.safetensors)."""
  from safetensors.numpy import save_file
  if not path.endswith(".safetensors"):
    os.makedirs(path, exist_ok=True)
    path = os.path.join(path, WEIGHT_NAME)
  save_file(state, path, metadata={"format": "pt"})
  return path


def read(path: str) -> dict:
  from safetensors.numpy import load_file
  if os.path.isdir(path):
    path = os.path.join(path, WEIGHT_NAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no LoRA file at {path!r}.")
  return load_file(path)


def _linears(config_json):
  """{diffusers module name: (in, out)} of every Linear of the MM-DiT ``config_json`` says."""
  return {_module_name(p[:-1]): tuple(shape) for p, shape in
          mmdit_keys.expected_shapes(config_json).items() if p[-1] == "kernel" and len(shape) == 2}


def check_fits(state: dict, config_json: dict, what: str, base: str):
  """Raises ConversionError (one line) unless every adapter of the LoRA ``state`` (named
  ``what``) adapts a Linear of the MM-DiT ``config_json`` (of ``base``) with its widths."""
  linears = _linears(config_json)
  for key in sorted(state):
    if not (key.startswith(PREFIX) and key.endswith((_A, _B))):
      raise common.ConversionError(
          f"{what}: {key!r} is not an SD3 transformer LoRA key (transformer.<module>.lora_A"
          ".weight / .lora_B.weight).")
    module = key[len(PREFIX):-len(_A)]
    shape = tuple(state[key].shape)
    if module not in linears:
      raise common.ConversionError(
          f"{what} adapts {module}, which the MM-DiT of {base} does not have: it is a LoRA "
          "for another base; apply it to the SD3 folder it was distilled from.")
    d_in, d_out = linears[module]
    width, want = (shape[1], d_in) if key.endswith(_A) else (shape[0], d_out)
    if width != want:
      raise common.ConversionError(
          f"{what}: {key} is {shape} but {module} of {base} has {d_in} -> {d_out}: it is a "
          "LoRA for another base; apply it to the SD3 folder it was distilled from.")


def read_checked(path: str, transformer_folder: str) -> dict:
  """The LoRA file at ``path``, checked against ``transformer_folder``'s MM-DiT."""
  from fgm_jax.convert import diffusers as dconv
  state = read(path)
  check_fits(state, dconv.read_config(transformer_folder), f"LoRA file {path!r}",
             f"{transformer_folder!r}")
  return state


def load_merged(path: str, transformer_folder: str, dtype=np.float32):
  """MM-DiT params of ``transformer_folder`` with the LoRA file at ``path`` merged
  (W + B A, as diffusers' fuse_lora), in the layout the folder loads in."""
  from fgm_jax.convert import diffusers as dconv
  state = read_checked(path, transformer_folder)
  config_json, weights = dconv.read_folder(transformer_folder)
  weights = dict(weights)
  for key in (k for k in state if k.endswith(_A)):
    name = key[len(PREFIX):-len(_A)] + ".weight"
    a = state[key].astype(np.float64)
    b = state[key[:-len(_A)] + _B].astype(np.float64)
    weights[name] = (weights[name].astype(np.float64) + b @ a).astype(weights[name].dtype)
  return mmdit_keys.params_from_state(weights, config_json, dtype=dtype)


def describe(state: dict) -> str:
  """'rank R, N modules, M MB' of a LoRA state, for the export's message."""
  ranks = sorted({v.shape[0] for k, v in state.items() if k.endswith(_A)})
  size = sum(v.nbytes for v in state.values()) / 2 ** 20
  return json.dumps({"rank": ranks, "modules": len(state) // 2, "MiB": round(size, 2)})
