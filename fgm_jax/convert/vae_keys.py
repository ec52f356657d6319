"""diffusers ``AutoencoderKL`` state-dict names <-> ``fgm_jax.models.vae`` params, both ways.

Our module tree mirrors the torch names, so each name maps mechanically:

    encoder.down_blocks.0.resnets.1.conv1.weight  <->  encoder/down_blocks_0/resnets_1/conv1/kernel
    decoder.mid_block.attentions.0.to_out.0.bias  <->  decoder/mid_block/attentions_0/to_out_0/bias

Conv weights go OIHW <-> HWIO, Linear weights are transposed, GroupNorm ``weight`` is
Flax's ``scale``. The expected tree comes from the model built from ``config``, so every
missing, unexpected or wrong-shape tensor is reported at once, by its torch name.
"""

import re
from typing import Any, Dict, Mapping, Tuple

import numpy as np

from fgm_jax.convert import common
from fgm_jax.models import vae

# Old checkpoints (pre-0.14 diffusers, original LDM exports) name the VAE attention
# differently; diffusers renames them on load, so we do too.
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

_INDEXED = re.compile(r"^(.*)_(\d+)$")


def _torch_module_name(flax_module_path: Tuple[str, ...]) -> str:
  # "down_blocks_0" -> "down_blocks.0"; names like "conv1" or "conv_in" stay as they are.
  parts = []
  for name in flax_module_path:
    match = _INDEXED.match(name)
    parts.append(f"{match.group(1)}.{match.group(2)}" if match else name)
  return ".".join(parts)


def _leaf_rule(leaf: str, ndim: int):
  """(torch leaf name, torch->flax transform, flax->torch transform) of one flax leaf."""
  if leaf == "bias":
    return "bias", common.identity, common.identity
  if leaf == "scale":  # GroupNorm affine weight
    return "weight", common.identity, common.identity
  if leaf == "kernel" and ndim == 4:
    return "weight", common.conv_to_flax, common.conv_to_torch
  if leaf == "kernel" and ndim == 2:
    return "weight", common.linear_to_dense, common.dense_to_linear
  raise ValueError(f"vae_keys: no torch layout rule for a {ndim}-d flax leaf {leaf!r}.")


def _expected(config) -> Dict[common.Path, Tuple[int, ...]]:
  """{flax path (without the 'params' collection): shape} of the model ``config`` builds."""
  return common.shape_tree(vae.param_shapes(vae.from_config(config))["params"])


def _torch_name(path: common.Path, ndim: int) -> str:
  leaf, _, _ = _leaf_rule(path[-1], ndim)
  return f"{_torch_module_name(path[:-1])}.{leaf}"


def _rename_legacy(state: Mapping[str, Any]) -> Dict[str, Any]:
  out = {}
  for name, value in state.items():
    parts = name.split(".")
    if "attentions" in parts and len(parts) >= 2 and parts[-2] in _LEGACY_ATTENTION:
      name = ".".join(parts[:-2] + [_LEGACY_ATTENTION[parts[-2]], parts[-1]])
      if parts[-1] == "weight" and np.ndim(value) == 4:  # stored as a 1x1 conv
        value = np.asarray(value)[:, :, 0, 0]
    out[name] = value
  return out


def params_from_state(state: Mapping[str, np.ndarray], config: Mapping[str, Any]):
  """diffusers/PyTorch state dict -> variables ``{"params": ...}`` for ``vae.from_config(config)``.

  Raises ``common.ConversionError`` naming every missing, unexpected or wrong-shape tensor.
  """
  expected = _expected(config)
  rules = []
  for path, shape in expected.items():
    _, to_flax, _ = _leaf_rule(path[-1], len(shape))
    rules.append((_torch_name(path, len(shape)), path, to_flax))
  values, sources, leftover = common.apply_rules(_rename_legacy(state), rules)
  params = common.fill_params(
      expected, values, sources, unexpected_sources=leftover,
      hint="For an AutoencoderKL, compare block_out_channels, layers_per_block, "
           "latent_channels, use_quant_conv, use_post_quant_conv and "
           "mid_block_add_attention with the weights.")
  return {"params": params}


def state_from_params(params, config: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """Variables ``{"params": ...}`` (or the bare params tree) -> diffusers state dict.

  The tree is checked against the model ``config`` describes first, so a folder written
  from mismatched params fails here rather than inside ``from_pretrained``.
  """
  tree = params["params"] if set(params) == {"params"} else params
  expected = _expected(config)
  checked = common.fill_params(expected, common.flatten(tree),
                               hint="The params do not belong to the model this config builds.")
  state = {}
  for path, value in common.flatten(checked).items():
    _, _, to_torch = _leaf_rule(path[-1], np.ndim(value))
    state[_torch_name(path, np.ndim(value))] = np.ascontiguousarray(to_torch(value))
  return state
