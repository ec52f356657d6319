"""The CIFAR-10 U-Net of the score-SDE family (DDPM++ / NCSN++), as a velocity net.

One Linen module, ``SongUNet``, expresses three published layouts:

* **EDM DDPM++** (Karras et al. 2022, ``SongUNet`` with ``--arch=ddpmpp``): 128 channels,
  multipliers (2, 2, 2), 4 residual blocks per level, attention at 16x16, positional time
  embedding, 'standard' encoder and decoder, resampling filter [1, 1]. 55,733,891 parameters at
  32x32x3 with the 9-dim augmentation input EDM checkpoints carry (``ddpmpp_cifar10()``).
* **EDM NCSN++** (``--arch=ncsnpp``): as above but Fourier time embedding of width 256
  (``channel_mult_noise=2``), 'residual' encoder, filter [1, 3, 3, 1] (``ncsnpp_cifar10()``).
* **score_sde / 1-Rectified-Flow DDPM++** (``configs/rectified_flow/cifar10_rf_gaussian_ddpmpp``
  in gnobitab/RectifiedFlow, i.e. score_sde's ``ncsnpp`` model with resblock_type='biggan'):
  ``rectified_flow_cifar10()``. Its options map onto ours as follows:

      score_sde field            ours
      nf=128                     model_channels=128
      ch_mult=(1,2,2,2)          channel_mult=(1, 2, 2, 2)
      num_res_blocks=4           num_blocks=4
      attn_resolutions=(16,)     attn_resolutions=(16,)
      dropout=0.15               dropout=0.15
      embedding_type            'positional' -> embedding_type='positional', channel_mult_noise=1
                                 'fourier' -> embedding_type='fourier', channel_mult_noise=2,
                                 fourier_scale=model.fourier_scale
      resblock_type='biggan'     the only block we have (up/down inside a residual block)
      skip_rescale=True          always on (every residual sum is scaled by 1/sqrt(2))
      fir=False / True           resample_filter=(1, 1) / fir_kernel, e.g. (1, 3, 3, 1)
      progressive_input          'none' / 'input_skip' / 'residual' ->
                                 encoder_type='standard' / 'skip' / 'residual'
      progressive                'none' / 'output_skip' -> decoder_type='standard' / 'skip'
                                 ('residual' is not supported; no CIFAR-10 config uses it)
      progressive_combine='sum'  the only combiner we have
      conditional=True           always on (the net is time-conditional)
      centered=True              data in [-1, 1] goes in unchanged (we never rescale inputs)
      model(x, 999 * t_rf)       time_scale=999, time_reverse=True, output_scale=-1:
                                 RectifiedFlow has t_rf = 1 at data and predicts x_data - noise,
                                 we have t = 0 at data and predict noise - x_data.

  Layer-by-layer, score_sde's ResnetBlockBigGANpp + AttnBlockpp pair is our ``UNetBlock`` with
  ``attention=True`` (same GroupNorm(min(32, C/4), eps 1e-6), same temb bias, same 1x1 skip on
  a channel change or resample, same 1/sqrt(2) rescales), its middle ResBlock-Attn-ResBlock is
  our ``in0``/``in1``, and its decoder attention after the last block of a level is ours at
  ``block{num_blocks}``. Weight import is therefore a renaming plus layout changes:
  torch conv (O, I, kh, kw) -> ours (kh, kw, I, O); torch linear (O, I) -> ours (I, O);
  score_sde's separate attention NIN_0/1/2 (q, k, v) are *interleaved* into our ``qkv`` kernel
  (output channel 3 * c + j for j in q, k, v), which is EDM's layout and so EDM's ``qkv``
  imports unchanged.

Parameter paths mirror EDM's module names, so an EDM import is mechanical too: EDM
``enc.16x16_block0.conv0.weight`` is our ``enc_16x16_block0/conv0/kernel``, ``dec.32x32_aux_conv``
is ``dec_32x32_aux_conv``, ``map_layer0.weight`` is ``map_layer0/kernel``, GroupNorm ``weight``
is ``scale``, and NCSN++'s ``map_noise.freqs`` buffer is the ``map_noise/freqs`` parameter.
tests/unit/test_unet.py checks one attention block against EDM's block semantics in PyTorch.

Velocity-net contract (fgm_jax/models/__init__.py):
``module.apply(variables, x, t, cond=None, train=False, rngs={'dropout': key})``, ``x`` NHWC,
``t`` in [0, 1] per example, t = 0 data and t = 1 noise; returns ``v`` shaped like ``x``.
``cond`` is None or a dict with optional ``"label"`` ((B, label_dim) one-hot or (B,) int) and
``"augment"`` ((B, augment_dim)); a missing entry is zeros, which for labels is the
unconditional (classifier-free guidance) input, as in EDM.

Time: the network sees ``noise_label = time_scale * (1 - t if time_reverse else t)``. We default
to 1000 for the positional embedding (its frequencies, 1 ... 1e-4, were designed for DDPM's
0...999 step index) and to 1 for the Fourier embedding (its N(0, 16^2) frequencies were designed
for log-sigma inputs spanning a few units); 999 matches RectifiedFlow checkpoints.

Mixed precision (``config.model.dtype = 'bfloat16'``; for a distill run the three networks'
switch is ``config.teacher.model.dtype``): parameters, and so the optimizer state, stay float32;
every convolution and matmul takes bfloat16 operands (weights cast on the fly); GroupNorm
statistics, the attention logits and softmax (a bfloat16 matmul accumulated in float32), the
mapping network (time / label embedding) and the output scaling are float32, and the output has
the input's dtype (float32 in every training step), so the losses are float32 too.
tests/unit/test_mixed_precision.py checks 200 bfloat16 FGM iterations against float32 ones. The Fourier frequencies are a parameter ('map_noise/freqs'), as in
score_sde's Flax code, held fixed by a stop_gradient; they receive no gradient, but exclude them
from weight decay if you use it. Initialisation follows EDM's SongUNet (Xavier-uniform, the
last conv of every residual branch and the output conv scaled by 1e-5, attention qkv by
sqrt(0.2)).
"""

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

# ---------------------------------------------------------------------------------------------
# Initialisers. EDM scales Xavier-uniform weights by a gain g; the variance then scales by g^2.


def _xavier(gain: float = 1.0):
  return nn.initializers.variance_scaling(gain * gain, "fan_avg", "uniform")


INIT = _xavier(1.0)
INIT_ZERO = _xavier(1e-5)  # near-zero residual branch outputs: each block starts as identity
INIT_ATTN = _xavier(math.sqrt(0.2))

_DN = ("NHWC", "HWIO", "NHWC")

# ---------------------------------------------------------------------------------------------
# Resampling with a separable FIR filter: [1, 1] is 2x2 average pooling / nearest-neighbour
# upsampling, [1, 3, 3, 1] is the smoother filter of StyleGAN2 and NCSN++.


def resample_kernel(taps: Sequence[float]) -> np.ndarray:
  """Normalised 2-D filter (outer product of the taps), summing to one."""
  f = np.asarray(taps, np.float32)
  f = np.outer(f, f)
  return f / f.sum()


def _depthwise(x, f, *, pad: int, down: int = 1, up: int = 1):
  """Applies the same 2-D filter ``f`` to every channel of NHWC ``x``."""
  c = x.shape[-1]
  w = jnp.tile(jnp.asarray(f, x.dtype)[:, :, None, None], (1, 1, 1, c))
  return jax.lax.conv_general_dilated(
      x, w, window_strides=(down, down), padding=((pad, pad), (pad, pad)),
      lhs_dilation=(up, up), dimension_numbers=_DN, feature_group_count=c)


def _is_box(taps) -> bool:
  """[1, 1] (DDPM++'s default): 2x2 average pooling / nearest-neighbour upsampling exactly.
  Written as reshapes, not as a depthwise conv: cuDNN runs the grouped 2x2 conv ~50x slower
  than memory speed on an H100 (18% of a CIFAR-10 FGM iteration; results/speed.md)."""
  return len(taps) == 2 and taps[0] == taps[1]


def downsample_2d(x, taps: Sequence[float] = (1, 1)):
  """Filter then keep every second pixel (H, W halve)."""
  if _is_box(taps):
    n, h, w, c = x.shape
    blocks = x.reshape(n, h // 2, 2, w // 2, 2, c)
    return jnp.mean(blocks, axis=(2, 4), dtype=jnp.float32).astype(x.dtype)
  f = resample_kernel(taps)
  return _depthwise(x, f, pad=(f.shape[0] - 1) // 2, down=2)


def upsample_2d(x, taps: Sequence[float] = (1, 1)):
  """Zero-insertion upsampling then filtering (H, W double).

  Equals PyTorch's conv_transpose2d(x, 4 f, stride=2, padding=p), which EDM uses: a transposed
  conv is a correlation of the zero-dilated input with the flipped kernel, padded k - 1 - p.
  The factor 4 restores the mean lost to the inserted zeros.
  """
  if _is_box(taps):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  f = resample_kernel(taps) * 4.0
  k = f.shape[0]
  return _depthwise(x, f[::-1, ::-1], pad=k - 1 - (k - 1) // 2, up=2)


def _conv(x, w, pad: int):
  return jax.lax.conv_general_dilated(
      x, w, window_strides=(1, 1), padding=((pad, pad), (pad, pad)), dimension_numbers=_DN)


# ---------------------------------------------------------------------------------------------
# Layers.


class Conv2d(nn.Module):
  """Square conv with optional 2x up/down resampling (EDM's Conv2d, in NHWC).

  ``kernel=0`` means resampling only (no parameters). ``fused_resample`` (down only) convolves
  at full resolution and filters while striding, which is how EDM's 'residual' encoder and
  score_sde's FIR ``conv_downsample_2d`` do it; the result differs from resample-then-conv at the
  borders, so checkpoints need the right one.
  """
  features: int
  kernel: int
  use_bias: bool = True
  up: bool = False
  down: bool = False
  resample_filter: Sequence[float] = (1, 1)
  fused_resample: bool = False
  kernel_init: Callable = INIT
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    assert not (self.up and self.down)
    x = x.astype(self.dtype)
    w = None
    if self.kernel:
      shape = (self.kernel, self.kernel, x.shape[-1], self.features)
      w = self.param("kernel", self.kernel_init, shape, jnp.float32).astype(self.dtype)
    w_pad = self.kernel // 2
    if self.fused_resample and self.down and w is not None:
      f = resample_kernel(self.resample_filter)
      x = _conv(x, w, w_pad + (f.shape[0] - 1) // 2)
      x = _depthwise(x, f, pad=0, down=2)
    else:
      if self.up:
        x = upsample_2d(x, self.resample_filter)
      if self.down:
        x = downsample_2d(x, self.resample_filter)
      if w is not None:
        x = _conv(x, w, w_pad)
    if w is not None and self.use_bias:
      x = x + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(
          self.dtype)
    return x


def _group_norm(x, name: str, dtype, eps: float = 1e-6):
  # Up to 32 groups of at least 4 channels, as in both EDM and score_sde.
  return nn.GroupNorm(num_groups=min(32, x.shape[-1] // 4), epsilon=eps, dtype=dtype,
                      param_dtype=jnp.float32, name=name)(x)


def _dense(features: int, name: str, dtype, use_bias: bool = True):
  return nn.Dense(features, use_bias=use_bias, kernel_init=INIT, dtype=dtype,
                  param_dtype=jnp.float32, name=name)


def attention(q, k, v):
  """Softmax attention over tokens; inputs (B, heads, N, d).

  Both matmuls run in the inputs' dtype; the logits are accumulated and the softmax taken in
  float32 (bfloat16 logits would round away the small differences the softmax amplifies).
  """
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  w = jax.nn.softmax(logits / math.sqrt(q.shape[-1]), axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bhkd->bhqd", w, v)


class UNetBlock(nn.Module):
  """Residual block (score_sde's BigGAN-style block) with optional resampling and attention.

  h = conv1(dropout(silu(norm1(conv0(silu(norm0(x))) + affine(emb)))));  x' = (h + skip(x))/√2;
  then, with attention, x'' = (proj(attn(norm2(x'))) + x')/√2.
  """
  out_channels: int
  up: bool = False
  down: bool = False
  use_attention: bool = False
  num_heads: int = 1
  dropout: float = 0.0
  resample_filter: Sequence[float] = (1, 1)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, emb, train: bool = False):
    skip_scale = math.sqrt(0.5)
    cout = self.out_channels
    conv = lambda f, k, name, **kw: Conv2d(f, k, resample_filter=self.resample_filter,
                                           dtype=self.dtype, name=name, **kw)
    orig = x
    h = nn.silu(_group_norm(x, "norm0", self.dtype))
    h = conv(cout, 3, "conv0", up=self.up, down=self.down)(h)
    h = h + _dense(cout, "affine", self.dtype)(emb)[:, None, None, :]
    h = nn.silu(_group_norm(h, "norm1", self.dtype))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv(cout, 3, "conv1", kernel_init=INIT_ZERO)(h)
    if cout != x.shape[-1] or self.up or self.down:
      orig = conv(cout, 1, "skip", up=self.up, down=self.down)(orig)
    x = (h + orig.astype(h.dtype)) * skip_scale
    if self.use_attention:
      x = (self._attend(x) + x) * skip_scale
    return x

  def _attend(self, x):
    b, hh, ww, c = x.shape
    heads = self.num_heads
    qkv = Conv2d(3 * c, 1, kernel_init=INIT_ATTN, dtype=self.dtype, name="qkv")(
        _group_norm(x, "norm2", self.dtype))
    # EDM channel layout: (head, channel-in-head, {q, k, v}), innermost fastest.
    qkv = qkv.reshape(b, hh * ww, heads, c // heads, 3).transpose(4, 0, 2, 1, 3)
    a = attention(qkv[0], qkv[1], qkv[2])  # (B, heads, N, d)
    a = a.transpose(0, 2, 1, 3).reshape(b, hh, ww, c)
    return Conv2d(c, 1, kernel_init=INIT_ZERO, dtype=self.dtype, name="proj")(a)


def positional_embedding(x, num_channels: int, max_positions: float = 10000.0):
  """[sin, cos] features with frequencies max_positions^(-i / (half - 1)), i = 0..half-1.

  This is score_sde's get_timestep_embedding (EDM's PositionalEmbedding with endpoint=True,
  after its sin/cos swap).
  """
  half = num_channels // 2
  freqs = (1.0 / max_positions) ** (jnp.arange(half, dtype=jnp.float32) / (half - 1))
  args = x.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class FourierEmbedding(nn.Module):
  """Random Fourier features [sin(2π f x), cos(2π f x)], f ~ N(0, scale²), f held fixed."""
  num_channels: int
  scale: float = 16.0

  @nn.compact
  def __call__(self, x):
    freqs = self.param("freqs", nn.initializers.normal(self.scale), (self.num_channels // 2,),
                       jnp.float32)
    args = x.astype(jnp.float32)[:, None] * (2 * np.pi * jax.lax.stop_gradient(freqs))[None, :]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


# ---------------------------------------------------------------------------------------------
# The network.


class SongUNet(nn.Module):
  """DDPM++ / NCSN++ U-Net velocity net. Fields are documented in ``default_config``."""
  model_channels: int = 128
  channel_mult: Sequence[int] = (2, 2, 2)
  channel_mult_emb: int = 4
  channel_mult_noise: int = 1
  num_blocks: int = 4
  attn_resolutions: Sequence[int] = (16,)
  num_heads: int = 1
  dropout: float = 0.10
  label_dim: int = 0
  label_dropout: float = 0.0
  augment_dim: int = 0
  embedding_type: str = "positional"
  encoder_type: str = "standard"
  decoder_type: str = "standard"
  resample_filter: Sequence[float] = (1, 1)
  max_positions: float = 10000.0
  fourier_scale: float = 16.0
  time_scale: float = 1000.0
  time_reverse: bool = False
  output_scale: float = 1.0
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, t, cond=None, train: bool = False):
    if x.ndim != 4:
      raise ValueError(f"SongUNet expects NHWC images, got shape {x.shape}")
    batch = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
    cond = cond or {}
    emb = self._embed(t, cond, batch, train)
    h, skips = self._encode(x, emb, train)
    out = self._decode(h, skips, emb, x.shape[-1], train)
    # Scaled in float32: the losses read this output at float32 precision.
    return (self.output_scale * out.astype(jnp.float32)).astype(x.dtype)

  # -- mapping network -------------------------------------------------------------------------

  def noise_labels(self, t):
    """What the time embedding sees for our t in [0, 1] (see the module docstring)."""
    return self.time_scale * ((1.0 - t) if self.time_reverse else t)

  def _embed(self, t, cond, batch, train):
    noise_ch = self.model_channels * self.channel_mult_noise
    emb_ch = self.model_channels * self.channel_mult_emb
    labels = self.noise_labels(t)
    if self.embedding_type == "positional":
      emb = positional_embedding(labels, noise_ch, self.max_positions)
    else:
      emb = FourierEmbedding(noise_ch, self.fourier_scale, name="map_noise")(labels)
    if self.label_dim:
      y = _class_labels(cond.get("label"), batch, self.label_dim)
      if train and self.label_dropout:
        keep = jax.random.uniform(self.make_rng("dropout"), (batch, 1)) >= self.label_dropout
        y = y * keep
      # EDM scales one-hot labels by sqrt(label_dim) so the projection sees unit-variance input.
      emb = emb + _dense(noise_ch, "map_label", jnp.float32)(y * math.sqrt(self.label_dim))
    if self.augment_dim:
      aug = cond.get("augment")
      aug = jnp.zeros((batch, self.augment_dim)) if aug is None else aug
      emb = emb + _dense(noise_ch, "map_augment", jnp.float32, use_bias=False)(
          jnp.asarray(aug, jnp.float32))
    emb = nn.silu(_dense(emb_ch, "map_layer0", jnp.float32)(emb))
    emb = nn.silu(_dense(emb_ch, "map_layer1", jnp.float32)(emb))
    return emb.astype(self.dtype)

  # -- encoder / decoder -----------------------------------------------------------------------

  def _block(self, out_channels, name, **kw):
    cls = nn.remat(UNetBlock, static_argnums=(3,)) if self.remat else UNetBlock
    return cls(out_channels, num_heads=self.num_heads, dropout=self.dropout,
               resample_filter=self.resample_filter, dtype=self.dtype, name=name, **kw)

  def _encode(self, x, emb, train):
    res0 = x.shape[1]
    h, aux = x.astype(self.dtype), x.astype(self.dtype)
    skips = []
    for level, mult in enumerate(self.channel_mult):
      r = f"enc_{res0 >> level}x{res0 >> level}"
      if level == 0:
        h = Conv2d(self.model_channels, 3, dtype=self.dtype, name=f"{r}_conv")(h)
        skips.append(h)
      else:
        c = h.shape[-1]
        h = self._block(c, f"{r}_down", down=True)(h, emb, train)
        if self.encoder_type == "skip":
          # Input-pyramid skip: filtered-downsampled image, 1x1-projected and added.
          aux = downsample_2d(aux, self.resample_filter)
          h = h + Conv2d(c, 1, dtype=self.dtype, name=f"{r}_aux_skip")(aux)
        elif self.encoder_type == "residual":
          # Residual pyramid: a strided conv of the previous level's features joins the trunk.
          aux = Conv2d(c, 3, down=True, resample_filter=self.resample_filter,
                       fused_resample=True, dtype=self.dtype, name=f"{r}_aux_residual")(aux)
          h = aux = (h + aux) / math.sqrt(2)
        skips.append(h)
      for idx in range(self.num_blocks):
        h = self._block(self.model_channels * mult, f"{r}_block{idx}",
                        use_attention=(res0 >> level) in self.attn_resolutions)(h, emb, train)
        skips.append(h)
    return h, skips

  def _decode(self, h, skips, emb, out_channels, train):
    res0 = h.shape[1] << (len(self.channel_mult) - 1)
    last = len(self.channel_mult) - 1
    out = None
    for level in reversed(range(len(self.channel_mult))):
      res = res0 >> level
      r = f"dec_{res}x{res}"
      c = h.shape[-1]
      if level == last:
        h = self._block(c, f"{r}_in0", use_attention=True)(h, emb, train)
        h = self._block(c, f"{r}_in1")(h, emb, train)
      else:
        h = self._block(c, f"{r}_up", up=True)(h, emb, train)
      for idx in range(self.num_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        attn = idx == self.num_blocks and res in self.attn_resolutions
        h = self._block(self.model_channels * self.channel_mult[level], f"{r}_block{idx}",
                        use_attention=attn)(h, emb, train)
      if self.decoder_type == "skip" or level == 0:
        # 'skip' decoder: every level emits an image, summed up the upsampled output pyramid.
        if out is not None:
          out = upsample_2d(out, self.resample_filter)
        tmp = nn.silu(_group_norm(h, f"{r}_aux_norm", self.dtype))
        tmp = Conv2d(out_channels, 3, kernel_init=INIT_ZERO, dtype=self.dtype,
                     name=f"{r}_aux_conv")(tmp)
        out = tmp if out is None else out + tmp
    assert not skips
    return out


def _class_labels(label, batch: int, label_dim: int):
  """(B,) ints or (B, label_dim) one-hot/soft labels -> float (B, label_dim); None -> zeros."""
  if label is None:
    return jnp.zeros((batch, label_dim), jnp.float32)
  label = jnp.asarray(label)
  if label.ndim == 1:
    return jax.nn.one_hot(label, label_dim, dtype=jnp.float32)
  return label.astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# Configs.

_EMBEDDINGS = ("positional", "fourier")
_ENCODERS = ("standard", "skip", "residual")
_DECODERS = ("standard", "skip")
COMPUTE_DTYPES = ("float32", "bfloat16")


def default_config() -> ml_collections.ConfigDict:
  """Every field of the 'unet' model config, with its default (EDM's DDPM++ for CIFAR-10)."""
  c = ml_collections.ConfigDict()
  c.name = "unet"
  c.model_channels = 128  # base width; level i has model_channels * channel_mult[i] channels
  c.channel_mult = (2, 2, 2)  # one entry per resolution level (each halves H and W)
  c.channel_mult_emb = 4  # embedding width = model_channels * channel_mult_emb
  c.channel_mult_noise = 1  # time-feature width = model_channels * this (1 DDPM++, 2 NCSN++)
  c.num_blocks = 4  # residual blocks per level in the encoder (decoder has one more)
  c.attn_resolutions = (16,)  # resolutions (height) with self-attention
  c.num_heads = 1  # attention heads (1 in DDPM++/NCSN++)
  c.dropout = 0.10  # dropout inside residual blocks, train mode only
  c.label_dim = 0  # number of classes; 0 = unconditional
  c.label_dropout = 0.0  # train-mode probability of zeroing the label (classifier-free guidance)
  c.augment_dim = 0  # EDM augmentation-label width (9 in EDM checkpoints); 0 = none
  c.embedding_type = "positional"  # 'positional' (DDPM++) or 'fourier' (NCSN++)
  c.encoder_type = "standard"  # 'standard', 'skip' (input pyramid) or 'residual' (NCSN++)
  c.decoder_type = "standard"  # 'standard' or 'skip' (output pyramid)
  c.resample_filter = (1, 1)  # FIR taps for up/down: (1, 1) DDPM++, (1, 3, 3, 1) NCSN++
  c.max_positions = 10000.0  # positional embedding: lowest frequency is 1 / max_positions
  c.fourier_scale = 16.0  # Fourier embedding: std of the random frequencies
  c.time_scale = ml_collections.config_dict.placeholder(float)  # None: 1000 positional, 1 fourier
  c.time_reverse = False  # feed 1 - t (checkpoints with t = 1 at data, e.g. RectifiedFlow)
  c.output_scale = 1.0  # multiplies the output (-1 for nets predicting data - noise)
  c.dtype = "float32"  # compute dtype ('bfloat16' on accelerators); parameters stay float32
  c.remat = False  # rematerialise each block in the backward pass (saves activation memory)
  return c


def ddpmpp_cifar10(**overrides) -> ml_collections.ConfigDict:
  """EDM's DDPM++ for CIFAR-10 (dropout 0.13, 9-dim augment input as in EDM checkpoints)."""
  c = default_config()
  c.dropout = 0.13
  c.augment_dim = 9
  c.update(overrides)
  return c


def ncsnpp_cifar10(**overrides) -> ml_collections.ConfigDict:
  """EDM's NCSN++ for CIFAR-10."""
  c = ddpmpp_cifar10()
  c.embedding_type = "fourier"
  c.channel_mult_noise = 2
  c.encoder_type = "residual"
  c.resample_filter = (1, 3, 3, 1)
  c.update(overrides)
  return c


def rectified_flow_cifar10(**overrides) -> ml_collections.ConfigDict:
  """1-Rectified Flow's CIFAR-10 teacher (score_sde DDPM++, see the module docstring)."""
  c = default_config()
  c.channel_mult = (1, 2, 2, 2)
  c.dropout = 0.15
  c.time_scale = 999.0
  c.time_reverse = True
  c.output_scale = -1.0
  c.update(overrides)
  return c


def tiny(**overrides) -> ml_collections.ConfigDict:
  """A small CPU-test U-Net for 8x8 images (e.g. scikit-learn digits): attention at 4x4."""
  c = default_config()
  c.model_channels = 16
  c.channel_mult = (1, 2)
  c.num_blocks = 1
  c.attn_resolutions = (4,)
  c.update(overrides)
  return c


def _validate(c) -> None:
  def check(ok, field, msg):
    if not ok:
      raise ValueError(f"config.model.{field}: {msg}")
  unknown = set(c.keys()) - set(default_config().keys())
  check(not unknown, ",".join(sorted(unknown)), "unknown field(s) for the 'unet' model")
  check(c.name == "unet", "name", f"expected 'unet', got {c.name!r}")
  check(c.dtype in COMPUTE_DTYPES, "dtype",
        f"got {c.dtype!r}; choose one of {COMPUTE_DTYPES} (parameters stay float32 either way)")
  check(c.embedding_type in _EMBEDDINGS, "embedding_type", f"must be one of {_EMBEDDINGS}")
  check(c.encoder_type in _ENCODERS, "encoder_type", f"must be one of {_ENCODERS}")
  check(c.decoder_type in _DECODERS, "decoder_type",
        f"must be one of {_DECODERS} (score_sde's 'residual' decoder is not implemented)")
  check(len(c.channel_mult) >= 1, "channel_mult", "needs at least one level")
  check(c.model_channels % 4 == 0, "model_channels", "must be a multiple of 4 (GroupNorm)")
  check(c.num_blocks >= 1, "num_blocks", "must be >= 1")
  check(0.0 <= c.dropout < 1.0, "dropout", "must be in [0, 1)")
  check(0.0 <= c.label_dropout < 1.0, "label_dropout", "must be in [0, 1)")
  check(len(c.resample_filter) % 2 == 0, "resample_filter",
        "needs an even number of taps (2x resampling stays aligned)")
  check(all(m * c.model_channels % c.num_heads == 0 for m in c.channel_mult), "num_heads",
        "must divide every level's channel count")


def from_config(model_config) -> SongUNet:
  """Builds the module from a (possibly partial) 'unet' model ConfigDict."""
  c = default_config()
  c.update(dict(model_config))
  _validate(c)
  time_scale = c.time_scale
  if time_scale is None:
    time_scale = 1000.0 if c.embedding_type == "positional" else 1.0
  return SongUNet(
      model_channels=c.model_channels, channel_mult=tuple(c.channel_mult),
      channel_mult_emb=c.channel_mult_emb, channel_mult_noise=c.channel_mult_noise,
      num_blocks=c.num_blocks, attn_resolutions=tuple(c.attn_resolutions),
      num_heads=c.num_heads, dropout=c.dropout, label_dim=c.label_dim,
      label_dropout=c.label_dropout, augment_dim=c.augment_dim,
      embedding_type=c.embedding_type, encoder_type=c.encoder_type,
      decoder_type=c.decoder_type, resample_filter=tuple(c.resample_filter),
      max_positions=c.max_positions, fourier_scale=c.fourier_scale,
      time_scale=float(time_scale), time_reverse=c.time_reverse,
      output_scale=c.output_scale, dtype=jnp.dtype(c.dtype), remat=c.remat)
