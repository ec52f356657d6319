"""SD3's KL autoencoder (diffusers ``AutoencoderKL``) as a Flax Linen module, NHWC.

The module tree mirrors the diffusers state-dict names so that weight conversion is a
mechanical rename (``down_blocks.0.resnets.1.conv1`` <-> ``down_blocks_0/resnets_1/conv1``):
see ``fgm_jax.convert.vae_keys``.

Latent convention (SD3): the diffusion model sees ``(mean - shift_factor) * scaling_factor``;
``images_from_latents`` inverts it before decoding. ``encode``/``decode`` themselves work in
the raw latent space, exactly like diffusers' ``AutoencoderKL.encode``/``decode``.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# diffusers hard-codes these inside Encoder/Decoder; they are not config keys.
_NORM_EPS = 1e-6
_LOGVAR_RANGE = (-30.0, 20.0)  # DiagonalGaussianDistribution clamps logvar to this range.


def _conv(features, kernel, name, dtype, stride=1, padding=None):
  # Torch pads symmetrically by kernel // 2; spell it out so SAME's asymmetric rule never applies.
  pad = kernel // 2 if padding is None else padding
  if isinstance(pad, int):
    pad = ((pad, pad), (pad, pad))
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad,
                 dtype=dtype, param_dtype=jnp.float32, name=name)


def _group_norm(groups, name, dtype):
  # Two-pass variance: the fast E[x^2] - E[x]^2 form loses the 1e-5 parity with PyTorch.
  return nn.GroupNorm(num_groups=groups, epsilon=_NORM_EPS, use_fast_variance=False,
                      dtype=dtype, param_dtype=jnp.float32, name=name)


class ResnetBlock(nn.Module):
  """Pre-norm residual block (GroupNorm, SiLU, conv) x 2, 1x1 shortcut when widths differ."""
  features: int
  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.silu(_group_norm(self.groups, "norm1", self.dtype)(x))
    h = _conv(self.features, 3, "conv1", self.dtype)(h)
    h = nn.silu(_group_norm(self.groups, "norm2", self.dtype)(h))
    h = _conv(self.features, 3, "conv2", self.dtype)(h)
    if x.shape[-1] != self.features:
      x = _conv(self.features, 1, "conv_shortcut", self.dtype)(x)
    return x + h


class SpatialAttention(nn.Module):
  """Single-head self-attention over all pixels, with its own GroupNorm and a residual."""
  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    h = _group_norm(self.groups, "group_norm", self.dtype)(x).reshape(b, hgt * wid, c)
    dense = lambda name: nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32, name=name)
    q, k, v = dense("to_q")(h), dense("to_k")(h), dense("to_v")(h)
    # diffusers upcasts the softmax; logits in float32 keep bf16 runs stable too.
    logits = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) / jnp.sqrt(c).astype(jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    h = jnp.einsum("bqk,bkc->bqc", weights, v)
    h = dense("to_out_0")(h)
    return x + h.reshape(b, hgt, wid, c)


class MidBlock(nn.Module):
  """resnet -> (attention) -> resnet at the lowest resolution."""
  features: int
  groups: int
  add_attention: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = ResnetBlock(self.features, self.groups, self.dtype, name="resnets_0")(x)
    if self.add_attention:
      x = SpatialAttention(self.groups, self.dtype, name="attentions_0")(x)
    return ResnetBlock(self.features, self.groups, self.dtype, name="resnets_1")(x)


class Downsample(nn.Module):
  """Stride-2 3x3 conv after padding one zero row/column at the bottom/right only."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return _conv(self.features, 3, "conv", self.dtype, stride=2, padding=((0, 1), (0, 1)))(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2, then a 3x3 conv."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(self.features, 3, "conv", self.dtype)(x)


class DownBlock(nn.Module):
  features: int
  num_layers: int
  groups: int
  add_downsample: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      x = ResnetBlock(self.features, self.groups, self.dtype, name=f"resnets_{i}")(x)
    if self.add_downsample:
      x = Downsample(self.features, self.dtype, name="downsamplers_0")(x)
    return x


class UpBlock(nn.Module):
  features: int
  num_layers: int
  groups: int
  add_upsample: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      x = ResnetBlock(self.features, self.groups, self.dtype, name=f"resnets_{i}")(x)
    if self.add_upsample:
      x = Upsample(self.features, self.dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """Image (NHWC) -> 2 * latent_channels moments at 1 / 2**(levels - 1) resolution."""
  block_out_channels: Sequence[int]
  layers_per_block: int
  latent_channels: int
  groups: int
  mid_attention: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    chans = self.block_out_channels
    x = _conv(chans[0], 3, "conv_in", self.dtype)(x)
    for i, features in enumerate(chans):
      x = DownBlock(features, self.layers_per_block, self.groups,
                    add_downsample=i < len(chans) - 1, dtype=self.dtype,
                    name=f"down_blocks_{i}")(x)
    x = MidBlock(chans[-1], self.groups, self.mid_attention, self.dtype, name="mid_block")(x)
    x = nn.silu(_group_norm(self.groups, "conv_norm_out", self.dtype)(x))
    return _conv(2 * self.latent_channels, 3, "conv_out", self.dtype)(x)


class Decoder(nn.Module):
  """Latent (NHWC) -> image; up blocks run widest-last, each with one extra resnet."""
  block_out_channels: Sequence[int]
  layers_per_block: int
  out_channels: int
  groups: int
  mid_attention: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    chans = tuple(reversed(self.block_out_channels))
    x = _conv(chans[0], 3, "conv_in", self.dtype)(z)
    x = MidBlock(chans[0], self.groups, self.mid_attention, self.dtype, name="mid_block")(x)
    for i, features in enumerate(chans):
      x = UpBlock(features, self.layers_per_block + 1, self.groups,
                  add_upsample=i < len(chans) - 1, dtype=self.dtype,
                  name=f"up_blocks_{i}")(x)
    x = nn.silu(_group_norm(self.groups, "conv_norm_out", self.dtype)(x))
    return _conv(self.out_channels, 3, "conv_out", self.dtype)(x)


class AutoencoderKL(nn.Module):
  """diffusers' AutoencoderKL (SD3 flavour by default: 16 latents, no quant convs).

  Field names follow diffusers' ``config.json``; build it with ``from_config``.
  ``dtype`` is the compute dtype; parameters are always float32.
  """
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 16
  norm_num_groups: int = 32
  scaling_factor: float = 1.5305
  shift_factor: Optional[float] = 0.0609
  use_quant_conv: bool = False
  use_post_quant_conv: bool = False
  mid_block_add_attention: bool = True
  sample_size: int = 1024
  dtype: Dtype = jnp.float32

  def setup(self):
    common = dict(block_out_channels=tuple(self.block_out_channels),
                  layers_per_block=self.layers_per_block, groups=self.norm_num_groups,
                  mid_attention=self.mid_block_add_attention, dtype=self.dtype)
    self.encoder = Encoder(latent_channels=self.latent_channels, **common)
    self.decoder = Decoder(out_channels=self.out_channels, **common)
    if self.use_quant_conv:
      self.quant_conv = _conv(2 * self.latent_channels, 1, None, self.dtype)
    if self.use_post_quant_conv:
      self.post_quant_conv = _conv(self.latent_channels, 1, None, self.dtype)

  def encode(self, x):
    """x: NHWC images in [-1, 1] -> (mean, logvar), each NHWC with latent_channels."""
    moments = self.encoder(x.astype(self.dtype))
    if self.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *_LOGVAR_RANGE)

  def decode(self, z):
    """z: raw (unscaled, unshifted) NHWC latents -> NHWC images (roughly in [-1, 1])."""
    z = z.astype(self.dtype)
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, x, rng=None):
    """Reconstruction: encode, take the mean (or a posterior sample with ``rng``), decode."""
    mean, logvar = self.encode(x)
    z = mean if rng is None else _sample(rng, mean, logvar)
    return self.decode(z)


def _sample(rng, mean, logvar):
  noise = jax.random.normal(rng, mean.shape, jnp.float32).astype(mean.dtype)
  return mean + jnp.exp(0.5 * logvar) * noise


def _shift(module):
  return 0.0 if module.shift_factor is None else module.shift_factor


def downscale(block_out_channels) -> int:
  """Image pixels per latent pixel: the encoder halves the size once per level after the
  first (8 for SD3's four-level VAE)."""
  return 2 ** (len(block_out_channels) - 1)


def latents_from_images(module, params, x, rng=None):
  """Images (NHWC, [-1, 1]) -> diffusion-space latents ``(z - shift) * scale``.

  ``z`` is the posterior mean, or a posterior sample when ``rng`` is given.
  ``params`` is the variables dict ``{"params": ...}`` of ``module``.
  """
  mean, logvar = module.apply(params, x, method=module.encode)
  z = mean if rng is None else _sample(rng, mean, logvar)
  return (z - _shift(module)) * module.scaling_factor


def images_from_latents(module, params, z):
  """Diffusion-space latents -> images (NHWC); the inverse scaling of ``latents_from_images``."""
  z = z / module.scaling_factor + _shift(module)
  return module.apply(params, z, method=module.decode)


def _check_config(config_json):
  """Rejects diffusers options this port does not implement, naming the offending key."""
  n = len(config_json["block_out_channels"])
  for key, kind in (("down_block_types", "DownEncoderBlock2D"),
                    ("up_block_types", "UpDecoderBlock2D")):
    types = tuple(config_json.get(key, (kind,) * n))
    if len(types) != n or any(t != kind for t in types):
      raise ValueError(f"vae config: {key}={types!r} is not supported; expected {n} x {kind!r} "
                       f"(one per block_out_channels entry).")
  if config_json.get("act_fn", "silu") not in ("silu", "swish"):
    raise ValueError(f"vae config: act_fn={config_json['act_fn']!r} is not supported; only 'silu'.")
  for key in ("latents_mean", "latents_std"):
    if config_json.get(key) is not None:
      raise ValueError(f"vae config: {key} is set; per-channel latent statistics are not "
                       "supported (SD3 uses scaling_factor and shift_factor).")
  groups = config_json.get("norm_num_groups", 32)
  for c in config_json["block_out_channels"]:
    if c % groups:
      raise ValueError(f"vae config: norm_num_groups={groups} does not divide "
                       f"block_out_channels entry {c}.")


def from_config(config_json, dtype=jnp.float32):
  """Builds the module from a diffusers ``config.json`` dict (or an ml_collections ConfigDict).

  Missing keys take diffusers' ``AutoencoderKL`` constructor defaults (not SD3's), as
  ``from_pretrained`` would; keys that only matter to PyTorch (force_upcast, tiling) are
  ignored. A ``dtype`` key in ``config_json`` overrides the argument.
  """
  config_json = dict(config_json.to_dict() if hasattr(config_json, "to_dict") else config_json)
  config_json.setdefault("block_out_channels", (64,))
  _check_config(config_json)
  sample_size = config_json.get("sample_size", 32)
  if isinstance(sample_size, (list, tuple)):
    sample_size = sample_size[0]
  dtype = config_json.get("dtype", dtype)
  return AutoencoderKL(
      in_channels=config_json.get("in_channels", 3),
      out_channels=config_json.get("out_channels", 3),
      block_out_channels=tuple(config_json["block_out_channels"]),
      layers_per_block=config_json.get("layers_per_block", 1),
      latent_channels=config_json.get("latent_channels", 4),
      norm_num_groups=config_json.get("norm_num_groups", 32),
      scaling_factor=float(config_json.get("scaling_factor", 0.18215)),
      shift_factor=config_json.get("shift_factor"),
      use_quant_conv=bool(config_json.get("use_quant_conv", True)),
      use_post_quant_conv=bool(config_json.get("use_post_quant_conv", True)),
      mid_block_add_attention=bool(config_json.get("mid_block_add_attention", True)),
      sample_size=int(sample_size),
      dtype=jnp.dtype(dtype) if isinstance(dtype, str) else dtype,
  )


def init_params(module, rng, image_size=None):
  """Random float32 variables ``{"params": ...}`` for ``module`` (one small forward pass)."""
  n = len(module.block_out_channels)
  size = image_size or 2 ** (n - 1)
  x = jnp.zeros((1, size, size, module.in_channels), jnp.float32)
  # Jitted: op-by-op init of a deep conv net is many times slower than compiling it.
  return jax.jit(module.init)(rng, x)


def param_shapes(module):
  """Shape tree of ``init_params`` without computing anything (for conversion checks)."""
  return jax.eval_shape(lambda: init_params(module, jax.random.PRNGKey(0)))
