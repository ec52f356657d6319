"""SD3 / SD3.5 MM-DiT (diffusers ``SD3Transformer2DModel``) as a Flax Linen velocity net.

Contract (shared by every model in fgm_jax)::

    v = module.apply(variables, x, t, cond, train=False)

* ``x``: NHWC latents (B, H, W, C); H and W divisible by ``patch_size``.
* ``t``: (B,) in [0, 1], t = 0 data, t = 1 noise. SD3 checkpoints were trained with
  timesteps in [0, 1000], so the model feeds ``1000 * t`` to its timestep embedding.
* ``cond``: ``{"context": (B, L, joint_attention_dim), "pooled": (B, pooled_projection_dim)}``
  (T5+CLIP token embeddings and pooled CLIP embeddings for SD3). Required: ``None``
  raises, since SD3's unconditional branch is the empty prompt's embeddings, not zeros.
* ``v``: same shape and dtype as ``x``. SD3 predicts ``noise - data`` which is exactly our
  velocity convention, so the network output is returned unchanged.

Layer semantics and chunk orders follow diffusers so that weights map one-to-one (only
transposes): adaLN-Zero splits as (shift, scale, gate, ...) while the continuous adaLN
(the last block's context norm and the output norm) splits as (scale, shift).

Parameters are float32; ``dtype`` is the compute dtype (bfloat16 on accelerators). Norm
statistics and the timestep sinusoid are computed in float32. The positional table is a
frozen buffer in diffusers; here it lives in ``params['pos_embed']`` so one tree loads and
saves, and ``trainable_mask`` excludes it from optimizers.

Block layout (``scan_layers``, default True): ``block_groups`` splits the blocks into runs
of identical ones (SD3.5's dual-attention prefix, the plain joint blocks; the last,
context_pre_only block always alone). A run of two or more is one ``nn.scan`` over the block
(remat inside the scanned body), so compile time does not grow with depth; its params live
under ``transformer_blocks_{start}_to_{stop-1}`` with every leaf stacked on a new leading
axis (logical name 'layers'); a lone block keeps ``transformer_blocks_{i}``. With
``scan_layers=False`` every block is its own ``transformer_blocks_{i}`` (unrolled).
``stack_blocks`` / ``unstack_blocks`` convert between the two; the diffusers converters map
names in the unrolled layout and stack or unstack.

Sharding: every parameter carries logical axis names (see ``LOGICAL_RULES``):

    embed      hidden width D of the transformer        -> 'fsdp'  (every big matrix has it)
    embed_in   input side of the two small D x D embedder kernels (flax forbids naming
               'embed' twice in one array)               -> None
    mlp        feed-forward hidden (4 D)                 -> 'tensor' (tensor-parallel rules)
    heads      flattened heads * head_dim of q/k/v/out   -> 'tensor' (tensor-parallel rules)
    mod        adaLN modulation outputs (2, 6 or 9 D)    -> None (see TENSOR_LOGICAL_RULES)
    context_in text-token width (joint_attention_dim)    -> None
    pooled_in  pooled text width                         -> None
    freq       sinusoidal timestep channels (256)        -> None
    conv_h/conv_w/conv_in  patch conv window and input channels -> None
    patch_out  proj_out outputs (p * p * C)              -> None
    pos        positional-table rows                     -> None
    kv         per-head channels (RMSNorm scales)        -> None
    layers     leading axis of a scanned run's stacked params -> None
    lora       rank axis of low-rank adapters (models/lora.py; an adapter's other axes are
               its kernel's)                             -> None
Activations: batch -> ('data', 'fsdp'); length, act_embed, act_kv, act_mod -> None;
act_heads, act_mlp -> 'tensor' in the tensor-parallel rules. Run sharded code inside
``jax.set_mesh(mesh)`` and ``nn.logical_axis_rules(rules)`` so the activation
constraints apply.
"""

import functools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fgm_jax import sharding as sharding_lib
from fgm_jax.models import lora

# Logical axis -> mesh axis (default: FSDP only, for a ('data', 'fsdp') mesh).
LOGICAL_RULES = sharding_lib.fsdp_rules(
    ("embed_in", "mlp", "heads", "mod", "context_in", "pooled_in", "freq", "conv_h", "conv_w",
     "conv_in", "patch_out", "pos", "kv", "layers", "length", "act_embed", "act_heads",
     "act_kv", "act_mlp", "act_mod", lora.RANK_AXIS))

# For a ('data', 'fsdp', 'tensor') mesh: Megatron-style splits of the head and MLP axes on
# top of FSDP over 'embed'. The adaLN projections stay FSDP-only: splitting their outputs
# over 'tensor' and then slicing them into chunks gave wrong results on XLA:CPU (jax
# 0.10.2) unless the modulation activations were pinned, so we do not rely on it.
TENSOR_LOGICAL_RULES = sharding_lib.tensor_parallel_rules(LOGICAL_RULES)

# diffusers' SD3Transformer2DModel defaults (config.json keys).
DIFFUSERS_DEFAULTS = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=18, attention_head_dim=64,
    num_attention_heads=18, joint_attention_dim=4096, caption_projection_dim=1152,
    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=96,
    dual_attention_layers=(), qk_norm=None)

# stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json.
SD3_MEDIUM = dict(DIFFUSERS_DEFAULTS, num_layers=24, num_attention_heads=24,
                  caption_projection_dim=1536, pos_embed_max_size=192)
# Built-in shapes, for compiling ahead of time without the weights (config.aot.architecture).
ARCHITECTURES = {"sd3-medium": SD3_MEDIUM}

_LN_EPS = 1e-6  # every LayerNorm / RMSNorm in SD3 uses 1e-6
_TIME_CHANNELS = 256
_TIME_SCALE = 1000.0  # checkpoints expect timesteps in [0, 1000]

# ----------------------------------------------------------------------------- helpers


def _dense(features, axes, name, dtype, zero=False):
  """A dense layer with logically-partitioned float32 params (lora.Dense: nn.Dense's params,
  plus low-rank adapters when the params carry them)."""
  init = nn.initializers.zeros_init() if zero else nn.initializers.xavier_uniform()
  return lora.Dense(
      features, dtype=dtype, param_dtype=jnp.float32, name=name,
      kernel_init=nn.with_logical_partitioning(init, axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[-1:]))


def _constrain(x, axes):
  # A no-op outside a mesh context; inside, pins the activation layout for GSPMD.
  return nn.with_logical_constraint(x, axes)


def layer_norm(x, eps=_LN_EPS):
  """Non-affine LayerNorm (biased variance, like torch), computed in float32."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x, shift, scale):
  return x * (1 + scale[:, None]) + shift[:, None]


def timestep_sinusoid(timesteps, dim=_TIME_CHANNELS, max_period=10000.0):
  """diffusers Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0): [cos, sin]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = timesteps.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def sincos_1d(dim, pos):
  """float64 [sin, cos] table of positions ``pos`` (numpy, host-side)."""
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.outer(pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim, grid_h, grid_w, base_size):
  """SD3's 2-D table, rows in raster order; first half of channels encode the column."""
  if dim % 4:
    raise ValueError(f"hidden size {dim} must be divisible by 4 for the 2-D sin-cos table.")
  rows = np.arange(grid_h, dtype=np.float32) / (grid_h / base_size)
  cols = np.arange(grid_w, dtype=np.float32) / (grid_w / base_size)
  col_grid, row_grid = np.meshgrid(cols, rows, indexing="xy")  # both (grid_h, grid_w)
  return np.concatenate([sincos_1d(dim // 2, col_grid), sincos_1d(dim // 2, row_grid)],
                        axis=1).astype(np.float32)


def crop_pos_table(table, max_size, h, w):
  """Centre crop of a (1, max*max, D) table to the h x w patch grid -> (1, h*w, D)."""
  if h > max_size or w > max_size:
    raise ValueError(f"Latent patch grid {h}x{w} exceeds pos_embed_max_size={max_size}; "
                     "use smaller latents or a model with a larger table.")
  top, left = (max_size - h) // 2, (max_size - w) // 2
  grid = table.reshape(1, max_size, max_size, -1)[:, top:top + h, left:left + w]
  return grid.reshape(1, h * w, -1)


_CUDNN_SEQ_MULTIPLE = 128  # cuDNN's flash-attention backward rejects odd lengths (1024+333)


def _pad_tokens(x, multiple):
  pad = -x.shape[1] % multiple
  return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else x


def padded_attention(q, k, v, impl, multiple):
  """Attention over sequences zero-padded to ``multiple`` tokens, the pad masked out.

  Exact: padded keys are excluded through ``key_value_seq_lengths`` and padded query rows
  are sliced off, so the result equals unpadded attention.
  """
  b, t, s = q.shape[0], q.shape[1], k.shape[1]
  out = jax.nn.dot_product_attention(
      _pad_tokens(q, multiple), _pad_tokens(k, multiple), _pad_tokens(v, multiple),
      query_seq_lengths=jnp.full((b,), t, jnp.int32),
      key_value_seq_lengths=jnp.full((b,), s, jnp.int32), implementation=impl)
  return out[:, :t]


def attention(q, k, v, impl):
  """(B, T, N, H) multi-head attention; ``impl`` is 'xla' or 'cudnn' (fused, GPUs)."""
  if impl == "cudnn" and (q.shape[1] % _CUDNN_SEQ_MULTIPLE or k.shape[1] % _CUDNN_SEQ_MULTIPLE):
    return padded_attention(q, k, v, impl, _CUDNN_SEQ_MULTIPLE)
  return jax.nn.dot_product_attention(q, k, v, implementation=impl)


# ----------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
  """Per-head RMS norm with a learned scale (diffusers RMSNorm, eps 1e-6)."""

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                             ("kv",)),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + _LN_EPS)
    return (x32 * scale).astype(x.dtype)


class AdaNorm(nn.Module):
  """Projects SiLU(temb) to ``chunks`` modulation vectors of width D."""
  chunks: int
  dtype: Any

  @nn.compact
  def __call__(self, temb, dim):
    mod = _dense(self.chunks * dim, ("embed", "mod"), "linear", self.dtype,
                 zero=True)(nn.silu(temb))
    mod = _constrain(mod, ("batch", "act_mod"))
    return jnp.split(mod, self.chunks, axis=-1)


class FeedForward(nn.Module):
  """Linear -> GELU(tanh) -> Linear, 4x hidden, as diffusers' FeedForward."""
  dtype: Any

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    h = _dense(4 * dim, ("embed", "mlp"), "fc1", self.dtype)(x)
    h = _constrain(nn.gelu(h, approximate=True), ("batch", "length", "act_mlp"))
    return _dense(dim, ("mlp", "embed"), "fc2", self.dtype)(h)


class Attention(nn.Module):
  """Self-attention over image tokens, optionally joint with a context stream.

  With ``context`` given, image and context tokens attend together (MM-DiT joint
  attention) and each stream has its own q/k/v/out projections. ``context_pre_only``
  marks the last block, whose context output is never used: there the context queries'
  projection exists (so checkpoints load) but its result is dead code for XLA.
  """
  heads: int
  head_dim: int
  qk_norm: Optional[str]
  context_pre_only: bool = False
  attention_impl: str = "xla"
  dtype: Any = jnp.float32

  def _qkv(self, x, prefix, names):
    inner = self.heads * self.head_dim
    out = []
    for n in names:
      y = _dense(inner, ("embed", "heads"), prefix + n, self.dtype)(x)
      y = y.reshape(y.shape[:2] + (self.heads, self.head_dim))
      out.append(_constrain(y, ("batch", "length", "act_heads", "act_kv")))
    return out

  def _norm(self, y, name):
    return RMSNorm(name=name)(y) if self.qk_norm == "rms_norm" else y

  @nn.compact
  def __call__(self, x, context=None):
    dim = x.shape[-1]
    inner = self.heads * self.head_dim
    q, k, v = self._qkv(x, "to_", ("q", "k", "v"))
    q, k = self._norm(q, "norm_q"), self._norm(k, "norm_k")
    if context is not None:
      cq, ck, cv = self._qkv(context, "add_", ("q_proj", "k_proj", "v_proj"))
      cq, ck = self._norm(cq, "norm_added_q"), self._norm(ck, "norm_added_k")
      k = jnp.concatenate([k, ck], axis=1)
      v = jnp.concatenate([v, cv], axis=1)
      if not self.context_pre_only:
        q = jnp.concatenate([q, cq], axis=1)
    out = attention(q, k, v, self.attention_impl)
    out = out.reshape(out.shape[:2] + (inner,))
    n = x.shape[1]
    x_out = _dense(dim, ("heads", "embed"), "to_out", self.dtype)(out[:, :n])
    if context is None or self.context_pre_only:
      return x_out, None
    c_out = _dense(dim, ("heads", "embed"), "to_add_out", self.dtype)(out[:, n:])
    return x_out, c_out


class JointBlock(nn.Module):
  """diffusers JointTransformerBlock: adaLN-Zero on both streams, joint attention, MLPs."""
  heads: int
  head_dim: int
  qk_norm: Optional[str]
  context_pre_only: bool
  dual_attention: bool
  attention_impl: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context, temb):
    dim = x.shape[-1]
    attn_kw = dict(heads=self.heads, head_dim=self.head_dim, qk_norm=self.qk_norm,
                   attention_impl=self.attention_impl, dtype=self.dtype)
    mods = AdaNorm(9 if self.dual_attention else 6, self.dtype, name="norm1")(temb, dim)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
    x_norm = layer_norm(x)
    x_in = modulate(x_norm, shift_msa, scale_msa)

    if self.context_pre_only:
      scale_c, shift_c = AdaNorm(2, self.dtype, name="norm1_context")(temb, dim)
      c_in = modulate(layer_norm(context), shift_c, scale_c)
    else:
      (c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp,
       c_gate_mlp) = AdaNorm(6, self.dtype, name="norm1_context")(temb, dim)
      c_in = modulate(layer_norm(context), c_shift_msa, c_scale_msa)

    x_attn, c_attn = Attention(context_pre_only=self.context_pre_only, name="attn",
                               **attn_kw)(x_in, c_in)
    x = x + gate_msa[:, None] * x_attn
    if self.dual_attention:
      # SD3.5: a second, image-only attention on the same normed input, own modulation.
      shift_msa2, scale_msa2, gate_msa2 = mods[6:]
      x_attn2, _ = Attention(name="attn2", **attn_kw)(modulate(x_norm, shift_msa2,
                                                               scale_msa2))
      x = x + gate_msa2[:, None] * x_attn2
    x_ff = FeedForward(self.dtype, name="ff")(modulate(layer_norm(x), shift_mlp, scale_mlp))
    x = _constrain(x + gate_mlp[:, None] * x_ff, ("batch", "length", "act_embed"))

    if self.context_pre_only:
      return x, None
    context = context + c_gate_msa[:, None] * c_attn
    c_ff = FeedForward(self.dtype, name="ff_context")(
        modulate(layer_norm(context), c_shift_mlp, c_scale_mlp))
    context = _constrain(context + c_gate_mlp[:, None] * c_ff,
                         ("batch", "length", "act_embed"))
    return x, context


# ----------------------------------------------------------------------------- block layout


def _block_kind(i, num_layers, dual_attention_layers):
  """(dual_attention, context_pre_only) of block ``i``: what makes blocks differ."""
  return i in tuple(dual_attention_layers), i == num_layers - 1


def block_groups(num_layers, dual_attention_layers=()):
  """Runs of consecutive identical blocks: [(start, stop, dual_attention, ends_pre_only)].

  SD3.5's dual-attention prefix and the plain joint blocks form their own runs. The last
  block (context_pre_only) joins the run before it when their attention matches
  (``ends_pre_only``): it then runs as a full joint block whose context output is dropped,
  with zero weights where diffusers' last block has none (see ``pad_last_block``), so every
  network pass is one scanned body: a separate last block costs as much compile time as the
  whole scanned run (SD3-Medium FGM step on v5p: 224 s with it folded in, 308 s without). A
  run of two or more is scanned; a lone block with ``ends_pre_only`` is a real
  context_pre_only block.
  """
  groups = []
  for i in range(num_layers):
    dual, last = _block_kind(i, num_layers, dual_attention_layers)
    if groups and groups[-1][2] == dual:
      groups[-1] = (groups[-1][0], i + 1, dual, last)
    else:
      groups.append((i, i + 1, dual, last))
  return groups


def block_name(i):
  return f"transformer_blocks_{i}"


def group_name(start, stop):
  """Params name of blocks [start, stop): a scanned run holds stacked leaves."""
  return block_name(start) if stop - start == 1 else f"{block_name(start)}_to_{stop - 1}"


def _scan_step(block, carry, temb):
  return block(*carry, temb), None


def _runs(module):
  """(start, stop, ends_pre_only) of every run ``module``'s architecture scans when scanning."""
  return [(start, stop, last) for start, stop, _, last in
          block_groups(module.num_layers, module.dual_attention_layers) if stop - start > 1]


def _stack(*leaves):
  if all(isinstance(a, np.ndarray) for a in leaves):
    return np.stack(leaves)
  return jnp.stack(leaves)


def _lib(a):
  return np if isinstance(a, np.ndarray) else jnp


# Where a full joint block has weights that diffusers' context_pre_only last block lacks.
_FULL_ONLY = (("attn", "to_add_out"), ("ff_context",))


def pad_last_block(last, full):
  """diffusers' last (context_pre_only) block's params -> a full joint block's structure
  (``full`` is any full block of the same run, for shapes): its context adaLN (scale, shift)
  becomes the (shift, scale) of a full block's first two chunks, every other chunk and the
  context output projection and MLP are zero. Run as a full block, its image output is the
  last block's; its context output, never used, gets zero gradients, so the zeros stay zero
  under Adam."""
  out = jax.tree.map(lambda f: _lib(f).zeros_like(f), full)
  out = _merge(out, {k: v for k, v in last.items()})
  lin = last["norm1_context"]["linear"]
  dim = lin["kernel"].shape[-1] // 2
  for leaf in ("kernel", "bias"):
    scale, shift = lin[leaf][..., :dim], lin[leaf][..., dim:]
    zeros = _lib(scale).zeros_like(scale)
    out["norm1_context"]["linear"][leaf] = _lib(scale).concatenate(
        [shift, scale] + [zeros] * 4, axis=-1)
  return out


def unpad_last_block(padded):
  """The inverse of ``pad_last_block``: a full block's params -> diffusers' last block. Also
  takes a block's low-rank adapters (models/lora.py; any subset of its projections): lora_b
  is cut like the kernel's outputs, lora_a (the inputs' side) is kept."""
  out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in padded.items()}
  for path in _FULL_ONLY:
    parent = out
    for k in path[:-1]:
      parent = parent.get(k, {})
    parent.pop(path[-1], None)
  if "norm1_context" in padded:
    out["norm1_context"] = {"linear": {
        leaf: a if leaf == lora.A else _scale_shift(a)
        for leaf, a in padded["norm1_context"]["linear"].items()}}
  return out


def _scale_shift(a):
  """A full block's 6-chunk context modulation outputs -> the last block's (scale, shift)."""
  dim = a.shape[-1] // 6
  return _lib(a).concatenate([a[..., dim:2 * dim], a[..., :dim]], axis=-1)


def _merge(base, update):
  """``base`` with ``update``'s leaves (nested dicts), copying the dicts it changes."""
  out = dict(base)
  for k, v in update.items():
    out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
  return out


def stack_blocks(params, module):
  """Unrolled params (``transformer_blocks_{i}``) -> ``module``'s layout: every scanned run
  becomes one subtree whose leaves are stacked along a new leading axis (a last block in
  the run padded to a full one first). Runs already stacked are kept; the identity when
  ``module.scan_layers`` is False."""
  out = dict(params)
  if not module.scan_layers:
    return out
  for start, stop, last in _runs(module):
    if group_name(start, stop) not in out:
      blocks = [out.pop(block_name(i)) for i in range(start, stop)]
      if last:
        blocks[-1] = pad_last_block(blocks[-1], blocks[0])
      out[group_name(start, stop)] = jax.tree.map(_stack, *blocks)
  return out


def unstack_blocks(params, module):
  """The inverse of ``stack_blocks``: stacked runs -> ``transformer_blocks_{i}``. Takes
  either layout of ``module``'s architecture (an unrolled tree comes back unchanged)."""
  out = dict(params)
  for start, stop, last in _runs(module):
    stacked = out.pop(group_name(start, stop), None)
    if stacked is not None:
      for k, i in enumerate(range(start, stop)):
        out[block_name(i)] = jax.tree.map(lambda a, k=k: a[k], stacked)
      if last:
        out[block_name(stop - 1)] = unpad_last_block(out[block_name(stop - 1)])
  return out


def to_layout(params, module):
  """Params of ``module``'s architecture in either layout -> ``module``'s own."""
  return stack_blocks(unstack_blocks(params, module), module)


class MMDiT(nn.Module):
  """SD3 MM-DiT velocity net. Fields are diffusers' config.json keys plus run options."""
  sample_size: int = 128
  patch_size: int = 2
  in_channels: int = 16
  num_layers: int = 18
  attention_head_dim: int = 64
  num_attention_heads: int = 18
  joint_attention_dim: int = 4096
  caption_projection_dim: int = 1152
  pooled_projection_dim: int = 2048
  out_channels: Optional[int] = 16
  pos_embed_max_size: Optional[int] = 96
  dual_attention_layers: Sequence[int] = ()
  qk_norm: Optional[str] = None
  dtype: Any = jnp.float32          # compute dtype; params are always float32
  attention_impl: str = "xla"       # 'xla' anywhere, 'cudnn' on GPUs (bf16/fp16)
  remat: str = "none"               # 'none' | 'full' | 'dots' (save matmul outputs)
  scan_layers: bool = True          # scan runs of identical blocks (see block_groups)

  @property
  def inner_dim(self):
    return self.num_attention_heads * self.attention_head_dim

  def _check(self):  # the architecture's own fields, known once the folder is read
    if self.caption_projection_dim != self.inner_dim:
      raise ValueError(
          f"caption_projection_dim={self.caption_projection_dim} must equal "
          f"num_attention_heads * attention_head_dim = {self.inner_dim}: the context stream "
          "shares the joint attention's width.")
    if self.qk_norm not in (None, "rms_norm"):
      raise ValueError(f"qk_norm={self.qk_norm!r} is not supported; use None or 'rms_norm'.")
    problem = _run_keys_problem(self.attention_impl, self.remat)
    if problem:
      raise ValueError(problem)

  def _block_class(self, scanned=False):
    if self.remat == "none":
      return JointBlock
    policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable
              if self.remat == "dots" else None)
    # Inside a scan the loop already keeps XLA from CSE-ing the recompute away, and
    # prevent_cse=True would only block optimisations (flax's advice for remat in scan).
    return nn.remat(JointBlock, policy=policy, prevent_cse=not scanned)

  def _blocks(self, tokens, context, temb):
    """The joint blocks in order: unrolled, or each run of identical blocks scanned."""
    groups = (block_groups(self.num_layers, self.dual_attention_layers) if self.scan_layers
              else [(i, i + 1) + _block_kind(i, self.num_layers, self.dual_attention_layers)
                    for i in range(self.num_layers)])
    for start, stop, dual, pre_only in groups:
      scanned = stop - start > 1
      # A scanned run ending in the last block runs it as a full block (pad_last_block).
      block = self._block_class(scanned)(
          heads=self.num_attention_heads, head_dim=self.attention_head_dim,
          qk_norm=self.qk_norm, context_pre_only=pre_only and not scanned,
          dual_attention=dual, attention_impl=self.attention_impl, dtype=self.dtype,
          name=group_name(start, stop))
      if not scanned:
        tokens, context = block(tokens, context, temb)
        continue
      scan = nn.scan(_scan_step, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(nn.broadcast,), length=stop - start,
                     metadata_params={nn.PARTITION_NAME: "layers"})
      (tokens, context), _ = scan(block, (tokens, context), temb)
      if pre_only:
        context = None  # the last block's context output is never used
    return tokens, context

  @nn.compact
  def __call__(self, x, t, cond=None, train=False):
    del train  # no dropout / batch statistics in MM-DiT
    self._check()
    if cond is None or "context" not in cond or "pooled" not in cond:
      raise ValueError('MM-DiT needs cond={"context": (B, L, joint_attention_dim), '
                       '"pooled": (B, pooled_projection_dim)} (text embeddings; use the '
                       "empty prompt's embeddings for the unconditional branch).")
    b, height, width, _ = x.shape
    p, dim = self.patch_size, self.inner_dim
    if height % p or width % p:
      raise ValueError(f"Latent size {height}x{width} is not divisible by patch_size={p}.")
    h, w = height // p, width // p
    out_channels = self.out_channels or self.in_channels

    tokens = self._patch_embed(x.astype(self.dtype), h, w)
    temb = self._time_text_embed(jnp.broadcast_to(t, (b,)), cond["pooled"])
    context = _dense(self.caption_projection_dim, ("context_in", "embed"),
                     "context_embedder", self.dtype)(cond["context"].astype(self.dtype))

    tokens, context = self._blocks(tokens, context, temb)

    scale, shift = AdaNorm(2, self.dtype, name="norm_out")(temb, dim)
    tokens = modulate(layer_norm(tokens), shift, scale)
    out = _dense(p * p * out_channels, ("embed", "patch_out"), "proj_out", self.dtype,
                 zero=True)(tokens)
    # unpatchify: (B, h*w, p*p*C) -> (B, h*p, w*p, C)
    out = out.reshape(b, h, w, p, p, out_channels).transpose(0, 1, 3, 2, 4, 5)
    return out.reshape(b, h * p, w * p, out_channels).astype(x.dtype)

  def _patch_embed(self, x, h, w):
    p, dim = self.patch_size, self.inner_dim
    conv = nn.Conv(dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                   param_dtype=jnp.float32, name="pos_embed_proj",
                   kernel_init=nn.with_logical_partitioning(
                       nn.initializers.xavier_uniform(),
                       ("conv_h", "conv_w", "conv_in", "embed")),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                          ("embed",)))
    tokens = conv(x).reshape(x.shape[0], h * w, dim)
    base = self.sample_size // p
    if self.pos_embed_max_size:
      m = self.pos_embed_max_size
      table = self.param(
          "pos_embed",
          nn.with_logical_partitioning(
              lambda *_: jnp.asarray(sincos_2d(dim, m, m, base))[None], (None, "pos",
                                                                         "embed")),
          (1, m * m, dim), jnp.float32)
      pos = crop_pos_table(table, m, h, w)
    else:  # fixed table for the actual grid (not stored in diffusers checkpoints)
      pos = jnp.asarray(sincos_2d(dim, h, w, base))[None]
    return _constrain(tokens + pos.astype(self.dtype), ("batch", "length", "act_embed"))

  def _time_text_embed(self, t, pooled):
    dim = self.inner_dim
    freq = timestep_sinusoid(_TIME_SCALE * t.astype(jnp.float32))
    temb = _dense(dim, ("freq", "embed"), "timestep_embedder_linear_1", self.dtype)(
        freq.astype(self.dtype))
    temb = _dense(dim, ("embed_in", "embed"), "timestep_embedder_linear_2", self.dtype)(
        nn.silu(temb))
    txt = _dense(dim, ("pooled_in", "embed"), "text_embedder_linear_1", self.dtype)(
        pooled.astype(self.dtype))
    txt = _dense(dim, ("embed_in", "embed"), "text_embedder_linear_2", self.dtype)(nn.silu(txt))
    return temb + txt


# ----------------------------------------------------------------------------- builders

_CONFIG_KEYS = tuple(DIFFUSERS_DEFAULTS)


def _dtype(name):
  return jnp.dtype(name) if isinstance(name, str) else name


def from_diffusers_config(config, dtype=jnp.float32, attention_impl="xla", remat="none",
                          scan_layers=None):
  """Builds an MMDiT from a diffusers config.json dict (unknown keys are ignored).

  ``scan_layers``: None takes the dict's 'scan_layers' key, default True (config.json files
  have none: the layout is ours, not diffusers')."""
  kw = {k: config.get(k, DIFFUSERS_DEFAULTS[k]) for k in _CONFIG_KEYS}
  kw["dual_attention_layers"] = tuple(kw["dual_attention_layers"] or ())
  if scan_layers is None:
    scan_layers = config.get("scan_layers", True)
  return MMDiT(dtype=_dtype(dtype), attention_impl=attention_impl, remat=remat,
               scan_layers=bool(scan_layers), **kw)


# config.model fields besides diffusers' keys (scan_layers also decides the params layout).
_RUN_KEYS = ("dtype", "attention_impl", "remat", "scan_layers")
DTYPES = ("float32", "bfloat16")


def _run_keys_problem(attention_impl, remat):
  if attention_impl not in ("xla", "cudnn"):
    return f"attention_impl={attention_impl!r}; use 'xla' or 'cudnn'."
  if remat not in ("none", "full", "dots"):
    return f"remat={remat!r}; use 'none', 'full' or 'dots'."
  return None


def check_config(model_config):
  """What is wrong with config.model's run keys (the diffusers keys come from a folder at run
  time and are checked by MMDiT._check), as 'model.<field>=...' or None; for config_checks."""
  if model_config.dtype not in DTYPES:
    return f"model.dtype={model_config.dtype!r}: choose 'float32' or 'bfloat16'."
  problem = _run_keys_problem(model_config.attention_impl, model_config.remat)
  return problem and "model." + problem


def from_config(model_config):
  """Registry factory: config.model (configs/common.mmdit: name, the _RUN_KEYS) with diffusers'
  keys; the ones it lacks take DIFFUSERS_DEFAULTS, as for a config.json."""
  config_json = model_config.to_dict()
  unknown = set(config_json) - set(_CONFIG_KEYS) - {"name"} - set(_RUN_KEYS)
  if unknown:
    raise ValueError(f"config.model has unknown MM-DiT fields {sorted(unknown)}; "
                     f"known: {sorted(_CONFIG_KEYS + _RUN_KEYS)}.")
  return from_diffusers_config(config_json, dtype=model_config.dtype,
                               attention_impl=model_config.attention_impl,
                               remat=model_config.remat, scan_layers=model_config.scan_layers)


def diffusers_config(module: MMDiT):
  """The config.json dict describing ``module`` (for exporting weights)."""
  config_json = {k: getattr(module, k) for k in _CONFIG_KEYS}
  config_json["dual_attention_layers"] = list(config_json["dual_attention_layers"])
  return config_json


def dummy_inputs(module: MMDiT, batch=1, height=None, width=None, text_len=8,
                 dtype=jnp.float32):
  """Zero inputs of the right shapes, for init / eval_shape."""
  height = height or module.sample_size
  width = width or module.sample_size
  x = jnp.zeros((batch, height, width, module.in_channels), dtype)
  t = jnp.zeros((batch,), jnp.float32)
  cond = {"context": jnp.zeros((batch, text_len, module.joint_attention_dim), dtype),
          "pooled": jnp.zeros((batch, module.pooled_projection_dim), dtype)}
  return x, t, cond


def abstract_variables(module: MMDiT, batch=1, height=None, width=None, text_len=8):
  """Boxed (logically partitioned) variable shapes without allocating anything."""
  x, t, cond = dummy_inputs(module, batch, height, width, text_len)
  return jax.eval_shape(functools.partial(module.init, train=False),
                        jax.random.PRNGKey(0), x, t, cond)


def param_count(module: MMDiT) -> int:
  shapes = nn.unbox(abstract_variables(module, height=2 * module.patch_size,
                                       width=2 * module.patch_size))["params"]
  return int(sum(np.prod(s.shape) for s in jax.tree_util.tree_leaves(shapes)))


# diffusers keeps the positional table as a (persistent) buffer, not a parameter: it is
# loaded from checkpoints but never trained. We keep it in 'params' so loading and saving
# are one tree; optimisers should mask it out with ``trainable_mask``.
FROZEN_PARAMS = ("pos_embed",)


# config.lora.targets -> the projections adapted (models/lora.py), as patterns over module
# paths; every joint block, scanned or not, both streams (and SD3.5's second attention).
_BLOCK = r"transformer_blocks_[^/]+"
LORA_TARGETS = {
    "attention": (_BLOCK + r"/attn2?/(to_q|to_k|to_v|to_out|add_q_proj|add_k_proj|add_v_proj"
                  r"|to_add_out)",),
    "mlp": (_BLOCK + r"/ff(_context)?/fc[12]",),
    "adaln": (_BLOCK + r"/norm1(_context)?/linear",),  # the blocks' modulation projections
}


def trainable_mask(params):
  """Pytree of bools like ``params``: False for the frozen positional table."""
  return {k: jax.tree_util.tree_map(lambda _: k not in FROZEN_PARAMS, v)
          for k, v in params.items()}


def example_cond(model_config, batch: int):
  """Zero text conditioning for init: parameter shapes do not depend on the token count."""
  _, _, cond = dummy_inputs(from_config(model_config), batch=batch, height=2, width=2)
  return cond
