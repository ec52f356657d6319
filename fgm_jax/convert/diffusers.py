"""Read and write diffusers-format model folders (config.json + safetensors), both ways.

A diffusers model folder (e.g. ``stable-diffusion-3-medium-diffusers/transformer``) holds

    config.json                                         the constructor arguments
    diffusion_pytorch_model.safetensors                 the weights, or when large:
    diffusion_pytorch_model-0000K-of-0000N.safetensors  shards, plus
    diffusion_pytorch_model.safetensors.index.json      {"weight_map": {name: shard file}}

Only safetensors is read: pickled ``.bin`` checkpoints can run code when loaded, so we
refuse them and say how to convert. No torch or diffusers import is needed here. Missing
folders, configs and weights raise ``FolderError`` (both a ``FileNotFoundError`` and a
``common.ConversionError``). The readers take the weight/index file names as arguments so
``fgm_jax.convert.transformers_folder`` (``model.safetensors``) shares them.

``load_params`` / ``save_params`` dispatch on ``kind`` to a key-mapping module
(``fgm_jax.convert.<kind>_keys``) that provides

    params_from_state(state: dict[str, np.ndarray], config: dict) -> params (nested dict)
    state_from_params(params, config: dict) -> dict[str, np.ndarray]
"""

import importlib
import json
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from fgm_jax.convert import common

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"

# kind -> (key-mapping module, diffusers class written into config.json's _class_name).
KINDS = {
    "mmdit": ("fgm_jax.convert.mmdit_keys", "SD3Transformer2DModel"),
    "vae": ("fgm_jax.convert.vae_keys", "AutoencoderKL"),
}


class FolderError(common.ConversionError, FileNotFoundError):
  """A model folder, its config.json or its weights are missing or unreadable.

  Both a ConversionError (one type to catch for any bad checkpoint) and a
  FileNotFoundError (what callers of ``read_folder`` have always caught).
  """


# ----------------------------------------------------------------------------- reading


def read_folder(folder: str, variant: Optional[str] = None,
                weights_name: str = WEIGHTS_NAME, index_name: str = INDEX_NAME
                ) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
  """Returns (config dict, {torch name: numpy array}) of a diffusers model folder.

  ``variant`` selects e.g. ``diffusion_pytorch_model.fp16.safetensors``. The file names are
  parameters so transformers folders (``model.safetensors``) share this reader.
  """
  folder = os.fspath(folder)
  check_folder(folder)
  config = read_config(folder)
  return config, read_weights(folder, variant, weights_name, index_name)


def check_folder(folder: str) -> None:
  """Raises FolderError unless ``folder`` is a directory."""
  if not os.path.isdir(os.fspath(folder)):
    raise FolderError(f"Model folder {os.fspath(folder)!r} does not exist.")


def read_weights(folder: str, variant: Optional[str] = None,
                 weights_name: str = WEIGHTS_NAME, index_name: str = INDEX_NAME
                 ) -> Dict[str, np.ndarray]:
  """{torch name: numpy array} from a folder's single safetensors file or its shards."""
  folder = os.fspath(folder)
  check_folder(folder)
  state: Dict[str, np.ndarray] = {}
  for path in _weight_files(folder, variant, weights_name, index_name):
    for name, array in _load_safetensors(path).items():
      if name in state:
        raise common.ConversionError(
            f"Tensor {name!r} appears in more than one file of {folder!r}.")
      state[name] = array
  return state


def read_config(folder: str) -> Dict[str, Any]:
  path = os.path.join(folder, CONFIG_NAME)
  if not os.path.isfile(path):
    hint = ""
    if os.path.isfile(os.path.join(folder, "model_index.json")):
      # A whole pipeline folder: the model lives in a subfolder.
      subs = sorted(d for d in os.listdir(folder)
                    if os.path.isfile(os.path.join(folder, d, CONFIG_NAME)))
      hint = (f" This looks like a pipeline folder; pass one of its model subfolders "
              f"instead, e.g. {[os.path.join(folder, d) for d in subs]}.")
    raise FolderError(f"No {CONFIG_NAME} in {folder!r}.{hint}")
  with open(path) as f:
    return json.load(f)


def _variant_name(name: str, variant: Optional[str]) -> str:
  # diffusers inserts the variant before the last extension.
  if not variant:
    return name
  stem, ext = name.rsplit(".", 1)
  return f"{stem}.{variant}.{ext}"


def _weight_files(folder: str, variant: Optional[str], weights_name: str = WEIGHTS_NAME,
                  index_name: str = INDEX_NAME):
  index = os.path.join(folder, _variant_name(index_name, variant))
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not weight_map:
      raise common.ConversionError(f"{index!r} has no 'weight_map'.")
    files = [os.path.join(folder, n) for n in sorted(set(weight_map.values()))]
    absent = [f for f in files if not os.path.isfile(f)]
    if absent:
      raise FolderError(f"{index!r} lists shard files that are missing: {absent}.")
    return files
  single = os.path.join(folder, _variant_name(weights_name, variant))
  if os.path.isfile(single):
    return [single]
  # Any other safetensors (a hand-written single file) — but never mix variants.
  others = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
  if len(others) == 1 and not variant:
    return [os.path.join(folder, others[0])]
  pickles = [n for n in os.listdir(folder) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
  msg = f"No {_variant_name(weights_name, variant)} (or shard index) in {folder!r}."
  if others:
    msg += f" Found {others}; pick one with variant=..."
  if pickles:
    msg += (f" Found pickled weights {pickles}, which we do not load (unpickling can run "
            "code). Re-save them as safetensors with the library that wrote them "
            "(diffusers or transformers): "
            "model.save_pretrained(folder, safe_serialization=True).")
  raise FolderError(msg)


def _load_safetensors(path: str) -> Dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # bf16 comes back as ml_dtypes.bfloat16
  return load_file(path)


# ----------------------------------------------------------------------------- writing


def write_folder(folder: str, config: Mapping[str, Any], state: Mapping[str, Any],
                 max_shard_bytes: Optional[int] = None) -> None:
  """Writes config.json and safetensors weights that diffusers' from_pretrained loads.

  With ``max_shard_bytes`` set and the weights larger than it, writes numbered shards and
  an index; otherwise a single file. Tensors are never split across shards.
  """
  from safetensors.numpy import save_file
  os.makedirs(folder, exist_ok=True)
  _remove_old_weights(folder)
  with open(os.path.join(folder, CONFIG_NAME), "w") as f:
    json.dump(_jsonable(dict(config)), f, indent=2, sort_keys=True)

  state = {k: np.ascontiguousarray(np.asarray(v)) for k, v in state.items()}
  shards = _plan_shards(state, max_shard_bytes)
  meta = {"format": "pt"}  # what torch-side loaders expect to find
  if len(shards) == 1:
    save_file(shards[0], os.path.join(folder, WEIGHTS_NAME), metadata=meta)
    return
  stem = WEIGHTS_NAME[:-len(".safetensors")]
  weight_map = {}
  for i, shard in enumerate(shards):
    name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(folder, name), metadata=meta)
    weight_map.update({k: name for k in shard})
  total = sum(int(v.nbytes) for v in state.values())
  with open(os.path.join(folder, INDEX_NAME), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2,
              sort_keys=True)


def _plan_shards(state, max_shard_bytes):
  if not max_shard_bytes:
    return [dict(state)]
  shards, current, size = [], {}, 0
  for name in sorted(state):
    n = int(state[name].nbytes)
    if current and size + n > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = state[name]
    size += n
  shards.append(current)
  return shards


def _remove_old_weights(folder):
  # Stale shards from an earlier save would be picked up by the index-less fallback.
  for n in os.listdir(folder):
    if n.startswith("diffusion_pytorch_model") and (
        n.endswith(".safetensors") or n.endswith(".index.json")):
      os.remove(os.path.join(folder, n))


def _jsonable(obj):
  if isinstance(obj, Mapping):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, np.generic):
    return obj.item()
  return obj


# ----------------------------------------------------------------------------- params


def _kind(kind: str):
  if kind not in KINDS:
    raise ValueError(f"Unknown weights kind {kind!r}; choose one of {sorted(KINDS)}.")
  module_name, class_name = KINDS[kind]
  return importlib.import_module(module_name), class_name


def load_params(folder: str, kind: str, dtype=np.float32, variant: Optional[str] = None):
  """Reads a diffusers folder into (config dict, Flax params tree of ``kind``).

  Leaves are host numpy arrays cast to ``dtype`` (jnp.float32 / jnp.bfloat16 work), so a
  large model can go straight to sharded devices with ``jax.device_put(params, shardings)``
  without first landing whole on one accelerator.
  """
  keys, _ = _kind(kind)
  config, state = read_folder(folder, variant=variant)
  params = keys.params_from_state(state, config)
  dt = np.dtype(dtype)
  import jax  # only for tree_map; cheap once jax is imported anyway
  params = jax.tree_util.tree_map(lambda a: np.asarray(a, dtype=dt), params)
  return config, params


def save_params(folder: str, kind: str, config: Mapping[str, Any], params,
                max_shard_bytes: Optional[int] = None, dtype=None) -> None:
  """Writes Flax ``params`` of ``kind`` as a diffusers folder.

  Tensors keep the params' dtype unless ``dtype`` is given (e.g. jnp.bfloat16 to halve
  the files). Sharded jax arrays are gathered to the host leaf by leaf.
  """
  keys, class_name = _kind(kind)
  import jax
  cast = (lambda a: np.asarray(a, dtype=np.dtype(dtype))) if dtype is not None else np.asarray
  params = jax.tree_util.tree_map(cast, params)
  config = dict(config)
  state = keys.state_from_params(params, config)
  config["_class_name"] = class_name
  config.setdefault("_diffusers_version", _diffusers_version())
  write_folder(folder, config, state, max_shard_bytes=max_shard_bytes)


def _diffusers_version() -> str:
  try:
    from importlib.metadata import version
    return version("diffusers")
  except Exception:  # not installed: any recent version string will do
    return "0.30.0"
