"""CLIP text encoder (transformers ``CLIPTextModelWithProjection``) as a Flax Linen module.

Stable Diffusion 3 encodes prompts with two of these, CLIP-L/14 (``hidden_act='quick_gelu'``,
legacy ``eos_token_id=2``) and OpenCLIP bigG/14 (``hidden_act='gelu'``), called without an
attention mask. The forward pass follows transformers exactly so weights map one-to-one:

    embeddings = token_embedding[ids] + position_embedding[:L]
    each layer:  x += out_proj(causal_attention(layer_norm1(x)))
                 x += fc2(act(fc1(layer_norm2(x))))
    last_hidden_state = final_layer_norm(x)
    pooled = last_hidden_state[b, eos position];  text_embeds = pooled @ text_projection

``__call__(input_ids)`` returns a dict with ``hidden_states`` (embeddings output, then the
output of every layer, as transformers' ``output_hidden_states``; SD3 reads the
penultimate), ``last_hidden_state``, ``pooled`` and ``text_embeds`` (absent when
``with_projection`` is False, i.e. a plain ``CLIPTextModel``).

Parameters are float32; ``dtype`` is the compute dtype. LayerNorms run in float32.

Sharding: parameters carry logical axis names (see ``LOGICAL_RULES``):

    embed   hidden width                          -> 'fsdp' (every big matrix has it)
    mlp     feed-forward hidden (intermediate)    -> 'tensor' in TENSOR_LOGICAL_RULES
    heads   flattened heads * head_dim of q/k/v   -> 'tensor' in TENSOR_LOGICAL_RULES
    vocab   token-embedding rows                  -> None
    pos     position-embedding rows               -> None
    proj    text_projection outputs               -> None
    norm    LayerNorm scale / bias                -> None (tiny; replicated)
Activations: batch -> ('data', 'fsdp'); length, act_embed, act_kv -> None; act_heads,
act_mlp -> 'tensor' in the tensor-parallel rules.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fgm_jax import sharding as sharding_lib

LOGICAL_RULES = sharding_lib.fsdp_rules(
    ("mlp", "heads", "vocab", "pos", "proj", "norm", "length", "act_embed", "act_heads",
     "act_kv", "act_mlp"))
TENSOR_LOGICAL_RULES = sharding_lib.tensor_parallel_rules(LOGICAL_RULES)

# transformers' CLIPTextConfig defaults (config.json keys).
TRANSFORMERS_DEFAULTS = dict(
    vocab_size=49408, hidden_size=512, intermediate_size=2048, projection_dim=512,
    num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
    hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=2)

# Shapes of CLIP-L/14 and OpenCLIP bigG/14 (SD3's text_encoder / text_encoder_2). Load real
# checkpoints with their own config.json: eos_token_id in particular differs between exports.
CLIP_L = dict(TRANSFORMERS_DEFAULTS, hidden_size=768, intermediate_size=3072,
              projection_dim=768, num_attention_heads=12)
CLIP_G = dict(TRANSFORMERS_DEFAULTS, hidden_size=1280, intermediate_size=5120,
              projection_dim=1280, num_hidden_layers=32, num_attention_heads=20,
              hidden_act="gelu")

# transformers' ACT2FN names -> jax. 'gelu' is the exact (erf) GELU there.
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(nn.gelu, approximate=False),
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "relu": nn.relu,
}

# ----------------------------------------------------------------------------- helpers


def _dense(features, axes, name, dtype, use_bias=True):
  """nn.Dense with logically-partitioned float32 params."""
  return nn.Dense(
      features, dtype=dtype, param_dtype=jnp.float32, use_bias=use_bias, name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[-1:]))


def _constrain(x, axes):
  # A no-op outside a mesh context; inside, pins the activation layout for GSPMD.
  return nn.with_logical_constraint(x, axes)


def eos_positions(input_ids, eos_token_id):
  """Index of the pooled token per row, by transformers' rule.

  ``eos_token_id == 2`` marks configs written before transformers fixed the id: there the
  pooled token is the largest id (CLIP's end-of-text is the last vocabulary entry).
  Otherwise it is the first ``eos_token_id`` (pad may equal eos); 0 if there is none.
  """
  if eos_token_id == 2:
    return jnp.argmax(input_ids, axis=-1)
  return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class LayerNorm(nn.Module):
  """torch.nn.LayerNorm (biased variance, affine), computed in float32."""
  eps: float

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                             ("norm",)), (dim,), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           ("norm",)), (dim,), jnp.float32)
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
    return y.astype(x.dtype)


# ----------------------------------------------------------------------------- modules


class Attention(nn.Module):
  """Causal multi-head self-attention (transformers CLIPAttention)."""
  heads: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    head_dim = dim // self.heads
    qkv = []
    for n in ("q_proj", "k_proj", "v_proj"):
      y = _dense(dim, ("embed", "heads"), n, self.dtype)(x)
      y = y.reshape(y.shape[:2] + (self.heads, head_dim))
      qkv.append(_constrain(y, ("batch", "length", "act_heads", "act_kv")))
    out = jax.nn.dot_product_attention(*qkv, is_causal=True)
    out = out.reshape(out.shape[:2] + (dim,))
    return _dense(dim, ("heads", "embed"), "out_proj", self.dtype)(out)


class MLP(nn.Module):
  intermediate_size: int
  hidden_act: str
  dtype: Any

  @nn.compact
  def __call__(self, x):
    h = _dense(self.intermediate_size, ("embed", "mlp"), "fc1", self.dtype)(x)
    h = _constrain(ACTIVATIONS[self.hidden_act](h), ("batch", "length", "act_mlp"))
    return _dense(x.shape[-1], ("mlp", "embed"), "fc2", self.dtype)(h)


class EncoderLayer(nn.Module):
  """Pre-LN transformer layer (transformers CLIPEncoderLayer)."""
  heads: int
  intermediate_size: int
  hidden_act: str
  eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x):
    x = x + Attention(self.heads, self.dtype, name="self_attn")(
        LayerNorm(self.eps, name="layer_norm1")(x))
    x = x + MLP(self.intermediate_size, self.hidden_act, self.dtype, name="mlp")(
        LayerNorm(self.eps, name="layer_norm2")(x))
    return _constrain(x, ("batch", "length", "act_embed"))


class CLIPTextModel(nn.Module):
  """CLIP text transformer + projection. Fields are CLIPTextConfig's config.json keys."""
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 2
  with_projection: bool = True  # False for a plain transformers CLIPTextModel
  dtype: Any = jnp.float32      # compute dtype; params are always float32

  def _check(self, input_ids):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                       f"num_attention_heads={self.num_attention_heads}.")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; use one of "
                       f"{sorted(ACTIVATIONS)}.")
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}.")
    if input_ids.shape[1] > self.max_position_embeddings:
      raise ValueError(f"Sequence length {input_ids.shape[1]} exceeds "
                       f"max_position_embeddings={self.max_position_embeddings}; "
                       "truncate the tokens (SD3 uses 77).")

  @nn.compact
  def __call__(self, input_ids):
    self._check(input_ids)
    length = input_ids.shape[1]
    tok = self.param("token_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("vocab", "embed")),
        (self.vocab_size, self.hidden_size), jnp.float32)
    pos = self.param("position_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("pos", "embed")),
        (self.max_position_embeddings, self.hidden_size), jnp.float32)
    x = jnp.take(tok, input_ids, axis=0) + pos[None, :length]
    x = _constrain(x.astype(self.dtype), ("batch", "length", "act_embed"))

    hidden_states = [x]
    for i in range(self.num_hidden_layers):
      x = EncoderLayer(self.num_attention_heads, self.intermediate_size, self.hidden_act,
                       self.layer_norm_eps, self.dtype, name=f"layers_{i}")(x)
      hidden_states.append(x)
    last = LayerNorm(self.layer_norm_eps, name="final_layer_norm")(x)
    pooled = last[jnp.arange(last.shape[0]), eos_positions(input_ids, self.eos_token_id)]
    out = {"hidden_states": tuple(hidden_states), "last_hidden_state": last,
           "pooled": pooled}
    if self.with_projection:
      out["text_embeds"] = _dense(self.projection_dim, ("embed", "proj"), "text_projection",
                                  self.dtype, use_bias=False)(pooled)
    return out


# ----------------------------------------------------------------------------- builders

_CONFIG_KEYS = tuple(TRANSFORMERS_DEFAULTS)


def _dtype(name):
  return jnp.dtype(name) if isinstance(name, str) else name


def has_projection(config) -> bool:
  """False only when config.json names a plain CLIPTextModel (no text_projection)."""
  archs = list(config.get("architectures") or ())
  return not archs or "CLIPTextModelWithProjection" in archs or "CLIPTextModel" not in archs


def from_transformers_config(config, dtype=jnp.float32):
  """Builds a CLIPTextModel from a transformers config.json dict (unknown keys ignored)."""
  kw = {k: config.get(k, TRANSFORMERS_DEFAULTS[k]) for k in _CONFIG_KEYS}
  if kw["eos_token_id"] is None:
    kw["eos_token_id"] = TRANSFORMERS_DEFAULTS["eos_token_id"]
  kw["eos_token_id"] = int(kw["eos_token_id"])
  kw["layer_norm_eps"] = float(kw["layer_norm_eps"])
  return CLIPTextModel(with_projection=has_projection(config), dtype=_dtype(dtype), **kw)


def transformers_config(module: CLIPTextModel):
  """The config.json dict describing ``module`` (for exporting weights)."""
  config_json = {k: getattr(module, k) for k in _CONFIG_KEYS}
  config_json["architectures"] = ["CLIPTextModelWithProjection" if module.with_projection
                          else "CLIPTextModel"]
  config_json["model_type"] = "clip_text_model"
  return config_json


def abstract_variables(module: CLIPTextModel, batch=1, length=1):
  """Boxed (logically partitioned) variable shapes without allocating anything."""
  ids = jnp.zeros((batch, length), jnp.int32)
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), ids)


def param_count(module: CLIPTextModel) -> int:
  shapes = nn.unbox(abstract_variables(module))["params"]
  return int(sum(np.prod(s.shape) for s in jax.tree_util.tree_leaves(shapes)))
