"""transformers ``T5EncoderModel`` state dict <-> ``fgm_jax.models.t5.T5Encoder`` params.

Names map one-to-one (see ``torch_name``); Linear weights transpose, embeddings and norm
scales keep their layout. The expected params tree comes from ``jax.eval_shape`` of the
module built from the same config.json, so weights that config.json does not describe are
reported as missing / unexpected / mis-shaped keys, naming the transformers key.

Accepted extras, as transformers itself accepts them when loading a ``T5EncoderModel``:

* ``encoder.embed_tokens.weight`` is a tied copy of ``shared.weight``: ``shared`` wins
  when both are present, the copy is used when it is the only one;
* ``decoder.*`` and ``lm_head.*`` (a full ``T5ForConditionalGeneration`` checkpoint, e.g.
  google/t5-v1_1-xxl) are skipped.
"""

from typing import Any, Dict, Mapping

import numpy as np

from fgm_jax.convert import common

SHARED = "shared.weight"
TIED_COPY = "encoder.embed_tokens.weight"
_IGNORED_PREFIXES = ("decoder.", "lm_head.")

_ATTN = "layer.0.SelfAttention"
_FF = "layer.1.DenseReluDense"
# Flax module name inside block_{i} -> transformers module path inside encoder.block.{i}.
_BLOCK_RENAMES = {
    "attn_norm": "layer.0.layer_norm",
    "attn": _ATTN,
    "ff_norm": "layer.1.layer_norm",
    "ff": _FF,
}
_TOP_LEVEL = {
    ("shared",): SHARED,
    ("relative_attention_bias",): f"encoder.block.0.{_ATTN}.relative_attention_bias.weight",
    ("final_layer_norm", "scale"): "encoder.final_layer_norm.weight",
}
_BLOCK_PREFIX = "block_"


def torch_name(path) -> str:
  """Flax params path (tuple) -> transformers state-dict name."""
  path = tuple(path)
  if path in _TOP_LEVEL:
    return _TOP_LEVEL[path]
  block, *mods, leaf = path
  if not block.startswith(_BLOCK_PREFIX):
    raise KeyError(f"No transformers name for Flax path {common.path_str(path)}.")
  parts = [f"encoder.block.{block[len(_BLOCK_PREFIX):]}"]
  parts += [_BLOCK_RENAMES.get(m, m) for m in mods]
  parts.append({"kernel": "weight", "scale": "weight"}.get(leaf, leaf))
  return ".".join(parts)


def _to_flax(path):
  return common.linear_to_dense if path[-1] == "kernel" else common.identity


def _to_torch(path, array):
  return common.dense_to_linear(array) if path[-1] == "kernel" else np.asarray(array)


def expected_shapes(config: Mapping[str, Any]):
  """{flax path: shape} of the T5 encoder that ``config`` (config.json dict) describes."""
  from flax import linen as nn
  from fgm_jax.models import t5
  module = t5.from_transformers_config(config)
  return common.shape_tree(nn.unbox(t5.abstract_variables(module, length=1))["params"])


def _canonical_state(state: Mapping[str, Any]) -> Dict[str, Any]:
  """Drops decoder / lm_head keys and folds the tied embedding copy into ``shared``."""
  out = {k: v for k, v in state.items() if not k.startswith(_IGNORED_PREFIXES)}
  copy = out.pop(TIED_COPY, None)
  if SHARED not in out and copy is not None:
    out[SHARED] = copy
  return out


def params_from_state(state: Mapping[str, Any], config: Mapping[str, Any],
                      dtype=np.float32) -> Dict[str, Any]:
  """transformers state dict -> unboxed Flax params (raises listing every mismatch)."""
  expected = expected_shapes(config)
  state = _canonical_state(state)
  rules = [(torch_name(path), path, _to_flax(path)) for path in expected]
  values, sources, leftover = common.apply_rules(state, rules)
  return common.fill_params(
      expected, values, sources, unexpected_sources=leftover, dtype=dtype,
      source_shapes=common.stored_shapes(state, rules),
      hint="T5 keys: d_model, d_kv, num_heads, d_ff, num_layers, vocab_size, "
           "relative_attention_num_buckets and feed_forward_proj ('gated-*' has wi_0/wi_1, "
           "otherwise wi) must match the weights.")


def state_from_params(params, config: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """Unboxed Flax params -> transformers state dict (``shared.weight``, no tied copy)."""
  expected = expected_shapes(config)
  flat = common.flatten(params)
  common.fill_params(expected, flat, {p: torch_name(p) for p in expected})
  return {torch_name(p): _to_torch(p, a) for p, a in flat.items()}
