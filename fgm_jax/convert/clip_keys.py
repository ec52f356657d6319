"""transformers ``CLIPTextModelWithProjection`` state dict <-> ``fgm_jax.models.clip`` params.

Names map one-to-one by renaming path components; Linear weights transpose, embeddings and
LayerNorm parameters keep their layout. The expected params tree comes from
``jax.eval_shape`` of the module built from the same config.json, so weights that config
does not describe are reported as missing / unexpected / mis-shaped keys.

Encoder names carry a ``text_model.`` prefix in ``CLIPTextModelWithProjection`` files and
in older ``CLIPTextModel`` files; transformers 5 writes a plain ``CLIPTextModel`` without
it. Both are read. ``text_projection.weight`` never has the prefix.
"""

from typing import Any, Dict, Mapping

import numpy as np

from fgm_jax.convert import common

PREFIX = "text_model."
# Non-persistent buffer that older exports still wrote; it is always arange(max_positions).
IGNORED = ("embeddings.position_ids",)

_RENAMES = {
    "token_embedding": "embeddings.token_embedding",
    "position_embedding": "embeddings.position_embedding",
}
_LAYER_PREFIX = "layers_"


def torch_name(path, prefix: str = PREFIX) -> str:
  """Flax params path (tuple) -> transformers state-dict name."""
  if path[0] == "text_projection":
    return "text_projection.weight"
  if len(path) == 1:  # the two embedding tables are params of the top module
    return prefix + _RENAMES[path[0]] + ".weight"
  *mods, leaf = path
  parts = []
  for m in mods:
    if m.startswith(_LAYER_PREFIX):
      parts.append("encoder.layers." + m[len(_LAYER_PREFIX):])
    else:
      parts.append(m)
  parts.append({"kernel": "weight", "scale": "weight"}.get(leaf, leaf))
  return prefix + ".".join(parts)


def _to_flax(path):
  return common.linear_to_dense if path[-1] == "kernel" else common.identity


def _to_torch(path, array):
  return common.dense_to_linear(array) if path[-1] == "kernel" else np.asarray(array)


def state_prefix(state: Mapping[str, Any]) -> str:
  """'text_model.' when the file's encoder names carry it, else ''."""
  return PREFIX if any(k.startswith(PREFIX) for k in state) else ""


def expected_shapes(config: Mapping[str, Any]):
  """{flax path: shape} of the CLIP text model that ``config`` (config.json dict) describes."""
  from flax import linen as nn
  from fgm_jax.models import clip
  module = clip.from_transformers_config(config)
  return common.shape_tree(nn.unbox(clip.abstract_variables(module))["params"])


def params_from_state(state: Mapping[str, Any], config: Mapping[str, Any],
                      dtype=np.float32) -> Dict[str, Any]:
  """transformers state dict -> unboxed Flax params (raises listing every mismatch)."""
  prefix = state_prefix(state)
  state = {k: v for k, v in state.items() if k[len(prefix):] not in IGNORED}
  expected = expected_shapes(config)
  rules = [(torch_name(path, prefix), path, _to_flax(path)) for path in expected]
  values, sources, leftover = common.apply_rules(state, rules)
  hint = ""
  if "text_projection.weight" in leftover:
    hint = ("config.json names a plain CLIPTextModel but the weights have a "
            "text_projection: set architectures to ['CLIPTextModelWithProjection'].")
  return common.fill_params(expected, values, sources, unexpected_sources=leftover,
                            dtype=dtype, hint=hint,
                            source_shapes=common.stored_shapes(state, rules))


def state_from_params(params, config: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """Unboxed Flax params -> transformers state dict, ``text_model.``-prefixed names.

  A plain CLIPTextModel (config.json architectures ['CLIPTextModel']) gets unprefixed
  names, as transformers 5 writes them.
  """
  from fgm_jax.models import clip
  prefix = PREFIX if clip.has_projection(config) else ""
  expected = expected_shapes(config)
  flat = common.flatten(params)
  # Same full check as loading, so a tree that does not fit config.json is caught here.
  common.fill_params(expected, flat, {p: torch_name(p, prefix) for p in expected})
  return {torch_name(p, prefix): _to_torch(p, a) for p, a in flat.items()}
