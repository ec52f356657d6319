"""T5 v1.1 encoder (transformers' ``T5EncoderModel``) as a Flax Linen module.

SD3 conditions on the last hidden state of T5-XXL, so this returns exactly
``T5EncoderModel(input_ids, attention_mask)[0]``: the hidden states after the final RMS
norm, shape (B, L, d_model). Details that matter for parity with transformers:

* one shared token embedding, no positional embedding;
* a relative position bias (bidirectional buckets) that the first block owns and every
  block reuses; here it is one table at the top level, computed once per call;
* attention scores are NOT scaled by 1/sqrt(d_kv) (T5 folds it into the init of q);
* RMS norms without mean subtraction and without bias, statistics in float32;
* no biases anywhere, no dropout (inference only).

Parameters are float32; ``dtype`` is the compute dtype of the matmuls (bfloat16 on
accelerators). The residual stream, norms, position bias and softmax stay in float32: T5
activations grow large in deep layers, and this keeps bf16 runs close to fp32. The output
is float32.

Sharding: parameters carry logical axis names (see ``LOGICAL_RULES``):

    embed   d_model                                   -> 'fsdp' (every big matrix has it)
    vocab   token-embedding rows                      -> None
    heads   flattened num_heads * d_kv of q/k/v/o     -> 'tensor' (tensor-parallel rules)
    mlp     feed-forward hidden d_ff                  -> 'tensor' (tensor-parallel rules)
    buckets, rel_heads  the small relative-bias table -> None
    norm    RMS-norm scales (d_model)                 -> None
Activations: batch -> ('data', 'fsdp'); length, act_embed, act_kv -> None; act_heads and
act_mlp -> 'tensor' in the tensor-parallel rules.
"""

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fgm_jax import sharding as sharding_lib

LOGICAL_RULES = sharding_lib.fsdp_rules(
    ("vocab", "heads", "mlp", "kv", "buckets", "rel_heads", "norm", "length", "act_embed",
     "act_heads", "act_kv", "act_mlp"))
# ('data', 'fsdp', 'tensor') mesh: Megatron-style head / MLP splits on top of FSDP.
TENSOR_LOGICAL_RULES = sharding_lib.tensor_parallel_rules(LOGICAL_RULES)

# transformers' T5Config defaults (config.json keys).
TRANSFORMERS_DEFAULTS = dict(
    vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
    relative_attention_num_buckets=32, relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6, feed_forward_proj="relu")

# google/t5-v1_1-xxl, the text_encoder_3 of Stable Diffusion 3.
T5_V1_1_XXL = dict(TRANSFORMERS_DEFAULTS, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                   num_heads=64, feed_forward_proj="gated-gelu")

# transformers' ACT2FN names -> jax. 'gelu' is the exact erf GELU, 'gelu_new' the tanh one.
_ACTIVATIONS = {
    "relu": nn.relu,
    "gelu": functools.partial(nn.gelu, approximate=False),
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "silu": nn.silu,
    "swish": nn.silu,
}

# ----------------------------------------------------------------------------- helpers


def parse_feed_forward_proj(feed_forward_proj: str):
  """'gated-gelu' -> ('gelu_new', True), 'relu' -> ('relu', False), as T5Config does."""
  parts = feed_forward_proj.split("-")
  if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
    raise ValueError(f"feed_forward_proj={feed_forward_proj!r} must be 'ACT' or "
                     "'gated-ACT', e.g. 'gated-gelu' (T5 v1.1) or 'relu' (original T5).")
  act = "gelu_new" if feed_forward_proj == "gated-gelu" else parts[-1]
  if act not in _ACTIVATIONS:
    raise ValueError(f"feed_forward_proj={feed_forward_proj!r}: activation {act!r} is not "
                     f"supported; known: {sorted(_ACTIVATIONS)}.")
  return act, parts[0] == "gated"


def relative_position_bucket(relative_position, num_buckets=32, max_distance=128):
  """Bidirectional T5 buckets of ``key - query`` offsets (numpy, host-side).

  Mirrors transformers' ``T5Attention._relative_position_bucket`` step by step in
  float32, so bucket boundaries (a float log then truncation) land on the same integers.
  """
  rel = np.asarray(relative_position, dtype=np.int64)
  half = num_buckets // 2
  buckets = (rel > 0).astype(np.int64) * half
  rel = np.abs(rel)
  max_exact = half // 2
  is_small = rel < max_exact
  with np.errstate(divide="ignore"):  # log(0) only where is_small picks the exact bucket
    scaled = (np.log(rel.astype(np.float32) / np.float32(max_exact))
              / np.float32(math.log(max_distance / max_exact))
              * np.float32(half - max_exact))
  large = max_exact + np.where(is_small, 0, scaled).astype(np.int64)
  large = np.minimum(large, half - 1)
  return buckets + np.where(is_small, rel, large)


@functools.lru_cache(maxsize=32)
def _bucket_matrix(length, num_buckets, max_distance):
  """(length, length) int32 buckets of key - query; static per sequence length."""
  pos = np.arange(length)
  rel = pos[None, :] - pos[:, None]
  return relative_position_bucket(rel, num_buckets, max_distance).astype(np.int32)


def rms_norm_f32(x, scale, eps):
  """T5 LayerNorm: x / rms(x) * scale, no mean, no bias, in float32."""
  x32 = x.astype(jnp.float32)
  var = jnp.square(x32).mean(-1, keepdims=True)
  return x32 * jax.lax.rsqrt(var + eps) * scale


def _constrain(x, axes):
  # A no-op outside a mesh context; inside, pins the activation layout for GSPMD.
  return nn.with_logical_constraint(x, axes)


def _dense(features, axes, name, dtype):
  """Bias-free nn.Dense with logically-partitioned float32 params."""
  return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                  name=name, kernel_init=nn.with_logical_partitioning(
                      nn.initializers.normal(0.02), axes))


# ----------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
  """T5LayerNorm with a learned float32 scale; returns float32."""
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                             ("norm",)),
                       (x.shape[-1],), jnp.float32)
    return rms_norm_f32(x, scale, self.eps)


class SelfAttention(nn.Module):
  """T5Attention (encoder): unscaled scores + position bias + mask, softmax in float32."""
  num_heads: int
  d_kv: int
  dtype: Any = jnp.float32

  def _project(self, x, name):
    y = _dense(self.num_heads * self.d_kv, ("embed", "heads"), name, self.dtype)(x)
    y = y.reshape(x.shape[:2] + (self.num_heads, self.d_kv))
    return _constrain(y, ("batch", "length", "act_heads", "act_kv"))

  @nn.compact
  def __call__(self, x, bias):
    inner = self.num_heads * self.d_kv
    x = x.astype(self.dtype)
    q, k, v = (self._project(x, n) for n in ("q", "k", "v"))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(scores + bias, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v)
    out = out.reshape(out.shape[:2] + (inner,))
    return _dense(x.shape[-1], ("heads", "embed"), "o", self.dtype)(out)


class FeedForward(nn.Module):
  """T5DenseGatedActDense (act(wi_0 x) * wi_1 x -> wo) or T5DenseActDense (wi -> wo)."""
  d_ff: int
  act: str
  gated: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d_model = x.shape[-1]
    x = x.astype(self.dtype)
    act = _ACTIVATIONS[self.act]
    if self.gated:
      h = act(_dense(self.d_ff, ("embed", "mlp"), "wi_0", self.dtype)(x))
      h = h * _dense(self.d_ff, ("embed", "mlp"), "wi_1", self.dtype)(x)
    else:
      h = act(_dense(self.d_ff, ("embed", "mlp"), "wi", self.dtype)(x))
    h = _constrain(h, ("batch", "length", "act_mlp"))
    return _dense(d_model, ("mlp", "embed"), "wo", self.dtype)(h)


class Block(nn.Module):
  """T5Block (encoder): pre-norm self-attention and feed-forward, float32 residual."""
  num_heads: int
  d_kv: int
  d_ff: int
  act: str
  gated: bool
  eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, bias):
    h = RMSNorm(self.eps, name="attn_norm")(x)
    x = x + SelfAttention(self.num_heads, self.d_kv, self.dtype, name="attn")(h, bias)
    h = RMSNorm(self.eps, name="ff_norm")(x)
    x = x + FeedForward(self.d_ff, self.act, self.gated, self.dtype, name="ff")(h)
    return _constrain(x.astype(jnp.float32), ("batch", "length", "act_embed"))


class T5Encoder(nn.Module):
  """transformers' T5EncoderModel. Fields are T5Config keys plus the compute dtype."""
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "relu"
  dtype: Any = jnp.float32  # compute dtype of the matmuls; params are always float32

  @property
  def dense_act_fn(self):
    return parse_feed_forward_proj(self.feed_forward_proj)[0]

  @property
  def is_gated_act(self):
    return parse_feed_forward_proj(self.feed_forward_proj)[1]

  @nn.compact
  def __call__(self, input_ids, attention_mask: Optional[Any] = None):
    """(B, L) token ids [+ (B, L) mask, 1 = keep] -> (B, L, d_model) float32."""
    act, gated = parse_feed_forward_proj(self.feed_forward_proj)
    length = input_ids.shape[1]
    embedding = self.param(
        "shared", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                               ("vocab", "embed")),
        (self.vocab_size, self.d_model), jnp.float32)
    x = _constrain(jnp.take(embedding, input_ids, axis=0), ("batch", "length", "act_embed"))
    bias = self._position_bias(length)[None]  # (1, H, L, L)
    if attention_mask is not None:
      # Additive like transformers' eager path: masked keys get the float32 minimum.
      keep = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
      bias = bias + jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min)
    for i in range(self.num_layers):
      x = Block(self.num_heads, self.d_kv, self.d_ff, act, gated, self.layer_norm_epsilon,
                self.dtype, name=f"block_{i}")(x, bias)
    return RMSNorm(self.layer_norm_epsilon, name="final_layer_norm")(x)

  def _position_bias(self, length):
    """(H, L, L) float32 bias of the first block's bucket table, shared by all blocks."""
    table = self.param(
        "relative_attention_bias",
        nn.with_logical_partitioning(nn.initializers.normal(1.0), ("buckets", "rel_heads")),
        (self.relative_attention_num_buckets, self.num_heads), jnp.float32)
    buckets = _bucket_matrix(length, self.relative_attention_num_buckets,
                             self.relative_attention_max_distance)
    return jnp.transpose(jnp.take(table, jnp.asarray(buckets), axis=0), (2, 0, 1))


# ----------------------------------------------------------------------------- builders

_CONFIG_KEYS = tuple(TRANSFORMERS_DEFAULTS)


def _dtype(name):
  return jnp.dtype(name) if isinstance(name, str) else name


def from_transformers_config(config, dtype=jnp.float32) -> T5Encoder:
  """Builds a T5Encoder from a transformers T5Config dict / config.json (extra keys ignored).

  The activation comes from ``feed_forward_proj`` (as T5Config recomputes
  ``dense_act_fn`` / ``is_gated_act`` from it); a bad value raises here, not at apply.
  """
  kw = {k: config.get(k, TRANSFORMERS_DEFAULTS[k]) for k in _CONFIG_KEYS}
  parse_feed_forward_proj(kw["feed_forward_proj"])
  return T5Encoder(dtype=_dtype(dtype), **kw)


def transformers_config(module: T5Encoder):
  """The T5Config keys describing ``module`` (for exporting weights)."""
  return {k: getattr(module, k) for k in _CONFIG_KEYS}


def abstract_variables(module: T5Encoder, batch=1, length=8):
  """Boxed (logically partitioned) variable shapes without allocating anything."""
  ids = jnp.zeros((batch, length), jnp.int32)
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), ids)


def param_count(module: T5Encoder) -> int:
  shapes = nn.unbox(abstract_variables(module, length=1))["params"]
  return int(sum(np.prod(s.shape) for s in jax.tree_util.tree_leaves(shapes)))
