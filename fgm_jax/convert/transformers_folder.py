"""Read transformers-format model folders (config.json + safetensors) into Flax params.

A transformers model folder (e.g. ``stable-diffusion-3-medium-diffusers/text_encoder``) holds

    config.json                              the config, with ``architectures`` / ``model_type``
    model.safetensors                        the weights, or when large:
    model-0000K-of-0000N.safetensors         shards, plus
    model.safetensors.index.json             {"weight_map": {name: shard file}}

File reading is shared with ``fgm_jax.convert.diffusers`` (only the file names differ), so
the same rules hold: safetensors only (pickled ``.bin`` files can run code when loaded),
missing shards are named. No torch or transformers import is needed here.

``load_params`` dispatches on ``kind`` to a key-mapping module that provides

    params_from_state(state: dict[str, np.ndarray], config: dict) -> params (nested dict)

and first checks that config.json describes an architecture that kind can load, so a
T5 folder passed as CLIP fails with a message naming both rather than a list of keys.
"""

import importlib
import os
from typing import Any, Dict, Optional, Tuple

import numpy as np

from fgm_jax.convert import common
from fgm_jax.convert import diffusers as _files

CONFIG_NAME = _files.CONFIG_NAME
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# kind -> (key-mapping module, transformers classes in config.json's `architectures`).
KINDS = {
    "clip_text": ("fgm_jax.convert.clip_keys",
                  ("CLIPTextModelWithProjection", "CLIPTextModel")),
    "t5_encoder": ("fgm_jax.convert.t5_keys", ("T5EncoderModel",)),
}

# kind -> config.json `model_type`s it accepts (checked too, and alone when a hand-written
# config has no `architectures`).
MODEL_TYPES = {
    "clip_text": ("clip_text_model",),
    "t5_encoder": ("t5",),
}

FolderError = _files.FolderError  # missing folder / config.json / weights; a ConversionError


def read_folder(folder: str, variant: Optional[str] = None
                ) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
  """Returns (config dict, {torch name: numpy array}) of a transformers model folder."""
  return _files.read_folder(folder, variant=variant, weights_name=WEIGHTS_NAME,
                            index_name=INDEX_NAME)


def read_config(folder: str) -> Dict[str, Any]:
  folder = os.fspath(folder)
  _files.check_folder(folder)
  return _files.read_config(folder)


def check_architecture(config: Dict[str, Any], kind: str, folder: str = "") -> None:
  """Raises ConversionError when config.json names an architecture ``kind`` cannot load."""
  _, expected = _kind(kind)
  types = MODEL_TYPES.get(kind, ())
  archs = list(config.get("architectures") or ())
  model_type = config.get("model_type")
  arch_ok = not archs or any(a in expected for a in archs)
  type_ok = model_type is None or not types or model_type in types
  if arch_ok and type_ok:
    return
  found = []
  if archs:
    found.append(f"architectures {archs}")
  if model_type is not None:
    found.append(f"model_type {model_type!r}")
  where = f" in {os.path.join(folder, CONFIG_NAME)!r}" if folder else ""
  raise common.ConversionError(
      f"config.json{where} describes {' and '.join(found)}, but kind {kind!r} loads "
      f"{' or '.join(expected)} (model_type {' or '.join(map(repr, types))}). Pass the "
      f"folder of that model (e.g. an SD3 pipeline's text_encoder / text_encoder_3 "
      f"subfolder) or the matching kind; kinds: {sorted(KINDS)}.")


def load_params(folder: str, kind: str, dtype=np.float32, variant: Optional[str] = None):
  """Reads a transformers folder into (config dict, Flax params tree of ``kind``), the order
  of ``diffusers.load_params``.

  Leaves are host numpy arrays cast to ``dtype`` (jnp.float32 / jnp.bfloat16 work), so a
  large encoder can go straight to sharded devices with ``jax.device_put``.
  """
  module_name, _ = _kind(kind)
  folder = os.fspath(folder)
  config = read_config(folder)
  check_architecture(config, kind, folder)  # before reading gigabytes of weights
  state = _files.read_weights(folder, variant, WEIGHTS_NAME, INDEX_NAME)
  keys = importlib.import_module(module_name)
  params = keys.params_from_state(state, config)
  dt = np.dtype(dtype)
  import jax  # only for tree_map
  params = jax.tree_util.tree_map(lambda a: np.asarray(a, dtype=dt), params)
  return config, params


def _kind(kind: str):
  if kind not in KINDS:
    raise ValueError(f"Unknown transformers weights kind {kind!r}; choose one of "
                     f"{sorted(KINDS)}.")
  return KINDS[kind]
