"""diffusers ``SD3Transformer2DModel`` state dict <-> ``fgm_jax.models.mmdit.MMDiT`` params.

Names map one-to-one by renaming path components; values only change layout (Linear
weights transpose, the patch conv goes OIHW <-> HWIO). The expected params tree comes from
``jax.eval_shape`` of the module built from the same config.json, so a config that does not
describe the weights is reported as missing / unexpected / mis-shaped keys.

Names map in the unrolled layout (``transformer_blocks_{i}``, ``scan_layers=False``);
``params_from_state`` then stacks the scanned runs into the module's layout and
``state_from_params`` unstacks them first (``mmdit.stack_blocks`` / ``unstack_blocks``), so
files load and export the same whichever layout the model runs in.
"""

from typing import Any, Dict, Mapping

import numpy as np

from fgm_jax.convert import common

# Flax module name -> diffusers module path (components not listed keep their name).
_RENAMES = {
    "pos_embed_proj": "pos_embed.proj",
    "timestep_embedder_linear_1": "time_text_embed.timestep_embedder.linear_1",
    "timestep_embedder_linear_2": "time_text_embed.timestep_embedder.linear_2",
    "text_embedder_linear_1": "time_text_embed.text_embedder.linear_1",
    "text_embedder_linear_2": "time_text_embed.text_embedder.linear_2",
    "to_out": "to_out.0",
    "fc1": "net.0.proj",
    "fc2": "net.2",
}
_BLOCK_PREFIX = "transformer_blocks_"


def torch_name(path) -> str:
  """Flax params path (tuple) -> diffusers state-dict name."""
  if path == ("pos_embed",):
    return "pos_embed.pos_embed"  # the positional table is a buffer of PatchEmbed
  *mods, leaf = path
  parts = []
  for m in mods:
    if m.startswith(_BLOCK_PREFIX):
      parts.append("transformer_blocks." + m[len(_BLOCK_PREFIX):])
    else:
      parts.append(_RENAMES.get(m, m))
  parts.append({"kernel": "weight", "scale": "weight"}.get(leaf, leaf))
  return ".".join(parts)


def _to_flax(path, shape):
  """Layout transform torch -> flax for the leaf at ``path`` with flax ``shape``."""
  if path[-1] == "kernel":
    return common.conv_to_flax if len(shape) == 4 else common.linear_to_dense
  return common.identity


def _to_torch(path, array):
  if path[-1] == "kernel":
    return common.conv_to_torch(array) if np.ndim(array) == 4 else common.dense_to_linear(array)
  return np.asarray(array)


def _module(config, scan_layers=None):
  from fgm_jax.models import mmdit
  return mmdit.from_diffusers_config(config, scan_layers=scan_layers)


def expected_shapes(config: Mapping[str, Any]):
  """{flax path: shape} of the unrolled MM-DiT that ``config`` (config.json dict) describes:
  one ``transformer_blocks_{i}`` per diffusers block, the layout names map one-to-one."""
  from flax import linen as nn
  from fgm_jax.models import mmdit
  module = _module(config, scan_layers=False)
  p = module.patch_size
  abstract = mmdit.abstract_variables(module, batch=1, height=p, width=p, text_len=1)
  return common.shape_tree(nn.unbox(abstract)["params"])


def params_from_state(state: Mapping[str, Any], config: Mapping[str, Any],
                      dtype=np.float32) -> Dict[str, Any]:
  """diffusers state dict -> unboxed Flax params in the layout of the module that
  ``mmdit.from_diffusers_config(config)`` builds (scanned runs stacked unless config says
  scan_layers=False); raises listing every mismatch, by diffusers name."""
  from fgm_jax.models import mmdit
  expected = expected_shapes(config)
  rules = [(torch_name(path), path, _to_flax(path, shape)) for path, shape in expected.items()]
  values, sources, leftover = common.apply_rules(state, rules)
  params = common.fill_params(expected, values, sources, unexpected_sources=leftover,
                              dtype=dtype, source_shapes=common.stored_shapes(state, rules))
  return mmdit.stack_blocks(params, _module(config))


def state_from_params(params, config: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """Unboxed Flax params, unrolled or scanned -> diffusers state dict (float32 numpy unless
  params differ)."""
  from fgm_jax.models import mmdit
  expected = expected_shapes(config)
  flat = common.flatten(mmdit.unstack_blocks(params, _module(config)))
  # Same full check as loading, so a params tree that does not fit config.json is caught
  # here rather than by diffusers later.
  sources = {p: torch_name(p) for p in expected}
  common.fill_params(expected, flat, sources)
  return {torch_name(p): _to_torch(p, a) for p, a in flat.items()}
