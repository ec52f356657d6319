"""The FID Inception-V3 in Flax: pytorch-fid's network, its input pipeline and its weights.

FID is only comparable between papers when the features come from one network: the
TensorFlow Inception graph of 2015-12-05 that the original FID code used. pytorch-fid
ported it to PyTorch (``pt_inception-2015-12-05-6726825d.pth``); this module is that port
in Flax, layer for layer, and ``fgm_jax.convert.inception`` turns the ``.pth`` into the
safetensors file read here:

    python -m fgm_jax.convert.inception pt_inception-2015-12-05-6726825d.pth fid_inception.safetensors

    variables = inception.load_params("fid_inception.safetensors")   # or init_params(seed)
    feats = jax.jit(inception.pool_features)(variables, images)      # uint8 (B, H, W, 3)
                                                                      # -> float32 (B, 2048)

What "identical to pytorch-fid" covers (its ``InceptionV3()`` with the defaults FID uses:
output block 3, ``resize_input``, ``normalize_input``, ``use_fid_inception``):

* input: uint8 -> /255 (torchvision's ToTensor), a bilinear resize to 299x299 with
  ``align_corners=False`` and no antialiasing (torch's ``F.interpolate``; ``jax.image.resize``
  would antialias when shrinking, so the resize is written out here), then ``2x - 1``;
* torchvision's Inception3 trunk (BasicConv2d = conv without bias, BatchNorm eps 1e-3 with
  the running statistics, ReLU), with pytorch-fid's FID blocks: FIDInceptionA / C / E_1
  average-pool without counting the zero padding (``count_include_pad=False``, TensorFlow's
  rule), and FIDInceptionE_2 (Mixed_7c) max-pools in its pool branch;
* output: the 2048 channels of Mixed_7c averaged over the 8x8 grid ("pool3").

Parameter names follow torchvision's modules (``Mixed_6b/branch7x7dbl_3/conv/kernel``), so
each Flax leaf has one torch key. Convolutions run at HIGHEST precision: on GPUs and TPUs the
default would round inputs to TF32/bfloat16, and FID at the second decimal needs fp32.

Weights are never downloaded here; a missing file raises InceptionWeightsNotFoundError
saying where to get pytorch-fid's file and how to convert it. No torch import.
"""

import functools
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fgm_jax import params_tree

FEATURE_DIM = 2048
RESIZE_TO = 299  # pytorch-fid resizes every input to the size the TF graph was built for
BN_EPSILON = 1e-3  # torchvision's BasicConv2d (TensorFlow's default for this graph)
FORMAT = "fgm_jax.fid_inception_v3/1"

# The PyTorch file the converted weights come from (pytorch-fid's FID_WEIGHTS_URL).
FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   + FID_WEIGHTS_NAME)
FID_WEIGHTS_SIZE = "about 95.6 MB"
FID_WEIGHTS_SHA256_PREFIX = "6726825d"  # torch hub names files by their sha256's first digits
CONVERT_COMMAND = ("python -m fgm_jax.convert.inception " + FID_WEIGHTS_NAME
                   + " fid_inception.safetensors")


class InceptionWeightsNotFoundError(FileNotFoundError):
  """The converted FID Inception weights are not where the caller said."""


def _missing_weights_message(path: str) -> str:
  return (f"FID Inception weights not found at {path!r}. FID needs pytorch-fid's Inception "
          f"weights ({FID_WEIGHTS_NAME}, {FID_WEIGHTS_SIZE}, the TF 2015-12-05 Inception "
          f"ported to PyTorch; get it from pytorch-fid's GitHub release 'fid_weights': "
          f"{FID_WEIGHTS_URL}), converted once to safetensors with: {CONVERT_COMMAND}")


# ----------------------------------------------------------------------------- input pipeline


def _interp_weights(in_size: int, out_size: int):
  """(index0, index1, weight0, weight1) per output pixel of torch's bilinear resize along one
  axis, align_corners=False: source = (i + 0.5) * in/out - 0.5, clamped at 0 (ATen's
  area_pixel_compute_source_index), the upper neighbour clamped to the last pixel.

  Rounded as ATen's CPU kernel rounds for float images: the scale in float32, the source
  position as one fused multiply-add (exact in float64, then rounded once to float32). The
  weights then equal torch's bit for bit (tests/parity/test_inception_parity.py).
  """
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  half_steps = np.arange(out_size, dtype=f32) + f32(0.5)
  src = (np.float64(scale) * half_steps.astype(np.float64) - 0.5).astype(f32)
  src = np.maximum(src, f32(0))
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  w1 = np.clip(src - i0.astype(f32), f32(0), f32(1))
  return i0, i1, f32(1) - w1, w1


def resize_bilinear(x, height: int, width: int):
  """torch's ``F.interpolate(x, (height, width), mode='bilinear', align_corners=False)`` on
  NHWC: each output pixel mixes its 2x2 nearest source pixels, whatever the scale (no
  antialiasing filter when shrinking, unlike ``jax.image.resize``)."""
  for axis, out_size in ((1, height), (2, width)):
    in_size = x.shape[axis]
    if in_size == out_size:
      continue  # torch copies the input then (scale 1 lands every sample on a pixel)
    i0, i1, w0, w1 = _interp_weights(in_size, out_size)
    shape = [1, 1, 1, 1]
    shape[axis] = out_size
    x = (jnp.take(x, i0, axis=axis) * w0.reshape(shape)
         + jnp.take(x, i1, axis=axis) * w1.reshape(shape))
  return x


# ----------------------------------------------------------------------------- the network

# He init keeps activations O(1) through ~50 ReLU layers, so randomly initialised weights
# (tests, runs without the real file) still give spread-out, full-rank features.
_KERNEL_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")


class BasicConv(nn.Module):
  """torchvision's BasicConv2d: conv (no bias) -> BatchNorm (running stats) -> ReLU."""
  features: int
  kernel: Tuple[int, int]
  strides: Tuple[int, int] = (1, 1)
  padding: Tuple[int, int] = (0, 0)  # symmetric (rows, cols), as torch's Conv2d padding
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, self.kernel, self.strides,
                padding=[(p, p) for p in self.padding], use_bias=False,
                kernel_init=_KERNEL_INIT, precision=self.precision, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  # TensorFlow's average pool divides by the pixels inside the image only: FID blocks' patch.
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_stride2(x):
  return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class FIDInceptionA(nn.Module):
  """Mixed_5b/c/d (35x35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""
  pool_features: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv, precision=self.precision)
    b1 = conv(64, (1, 1), name="branch1x1")(x)
    b5 = conv(48, (1, 1), name="branch5x5_1")(x)
    b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (35x35 -> 17x17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv, precision=self.precision)
    b3 = conv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
    bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = conv(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class FIDInceptionC(nn.Module):
  """Mixed_6b..e (17x17): 1x1 | 1x7-7x1 | 7x1-1x7-7x1-1x7 | avgpool-1x1."""
  channels_7x7: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv, precision=self.precision)
    c7 = self.channels_7x7
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    b1 = conv(192, (1, 1), name="branch1x1")(x)
    b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = conv(c7, **row, name="branch7x7_2")(b7)
    b7 = conv(192, **col, name="branch7x7_3")(b7)
    bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = conv(c7, **col, name="branch7x7dbl_2")(bd)
    bd = conv(c7, **row, name="branch7x7dbl_3")(bd)
    bd = conv(c7, **col, name="branch7x7dbl_4")(bd)
    bd = conv(192, **row, name="branch7x7dbl_5")(bd)
    bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a (17x17 -> 8x8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv, precision=self.precision)
    b3 = conv(192, (1, 1), name="branch3x3_1")(x)
    b3 = conv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
    b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class FIDInceptionE(nn.Module):
  """Mixed_7b/c (8x8): 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1.

  ``pool='max'`` is FIDInceptionE_2 (Mixed_7c): the TF graph max-pools there, an accident
  of that graph that FID has kept ever since.
  """
  pool: str  # "avg" (FIDInceptionE_1) or "max" (FIDInceptionE_2)
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv, precision=self.precision)
    row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
    b1 = conv(320, (1, 1), name="branch1x1")(x)
    b3 = conv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([conv(384, **row, name="branch3x3_2a")(b3),
                          conv(384, **col, name="branch3x3_2b")(b3)], axis=-1)
    bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([conv(384, **row, name="branch3x3dbl_3a")(bd),
                          conv(384, **col, name="branch3x3dbl_3b")(bd)], axis=-1)
    if self.pool == "max":
      pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))  # pads with -inf
    else:
      pooled = _avg_pool_3x3(x)
    bp = conv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """pytorch-fid's ``InceptionV3([3])``: images in [0, 1], NHWC -> (B, 2048) pool3 features.

  ``image_size`` is the square size inputs are resized to: FID's is 299; smaller ones (at
  least 75) only make tests with random weights cheap, and None skips the resize. The
  variables are ``{'params': ..., 'batch_stats': ...}`` (BatchNorm's running mean and
  variance in ``batch_stats``).
  """
  image_size: Optional[int] = RESIZE_TO
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, images):
    p = self.precision
    x = images.astype(jnp.float32)
    if self.image_size is not None:
      x = resize_bilinear(x, self.image_size, self.image_size)
    x = 2.0 * x - 1.0  # (0, 1) -> (-1, 1), the range the TF graph was trained on
    x = BasicConv(32, (3, 3), strides=(2, 2), precision=p, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), precision=p, name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), precision=p, name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_stride2(x)
    x = BasicConv(80, (1, 1), precision=p, name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), precision=p, name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_stride2(x)
    x = FIDInceptionA(32, precision=p, name="Mixed_5b")(x)
    x = FIDInceptionA(64, precision=p, name="Mixed_5c")(x)
    x = FIDInceptionA(64, precision=p, name="Mixed_5d")(x)
    x = InceptionB(precision=p, name="Mixed_6a")(x)
    x = FIDInceptionC(128, precision=p, name="Mixed_6b")(x)
    x = FIDInceptionC(160, precision=p, name="Mixed_6c")(x)
    x = FIDInceptionC(160, precision=p, name="Mixed_6d")(x)
    x = FIDInceptionC(192, precision=p, name="Mixed_6e")(x)
    x = InceptionD(precision=p, name="Mixed_7a")(x)
    x = FIDInceptionE("avg", precision=p, name="Mixed_7b")(x)
    x = FIDInceptionE("max", precision=p, name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))  # adaptive average pool to 1x1


# ----------------------------------------------------------------------------- functions

# The smallest input the trunk accepts (its unpadded convs and pools shrink 75 to 1x1 at
# Mixed_7c): the variables' shapes are traced at this size, without the resize.
_MIN_SIZE = 75


def pool_features(variables, images, image_size: int = RESIZE_TO):
  """Pool3 features of uint8 images (B, H, W, 3), as pytorch-fid computes them.

  Pure and jittable (``jax.jit(pool_features, static_argnames='image_size')``); shard
  ``images`` over the batch axis and replicate ``variables``. Images must already be
  quantised to uint8, as the FID pipelines do before taking features (this function divides
  by 255 like torchvision's ToTensor). ``image_size`` other than 299 (at least 75) is for
  cheap tests only: FID is defined at 299.
  """
  if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise TypeError(f"pool_features takes uint8 images of shape (B, H, W, 3), got "
                    f"{images.dtype} {tuple(images.shape)}; quantise first, as the FID "
                    "pipelines do (fgm_jax.evaluation.fid.quantize).")
  if image_size < _MIN_SIZE:
    raise ValueError(f"image_size={image_size}: Inception-V3 needs at least {_MIN_SIZE} "
                     f"(FID uses {RESIZE_TO}).")
  model = FIDInceptionV3(image_size=image_size)
  return model.apply(variables, images.astype(jnp.float32) / 255.0)


def init_params(seed: int = 0) -> Dict[str, Any]:
  """Random variables for tests and runs without the real weights: kernels from the
  module's He truncated normal, BatchNorm at scale 1, bias 0, mean 0, variance 1. FID from
  these is not comparable with any published number.

  Drawn with numpy, not ``module.init``: XLA spends about a minute on CPU compiling the 94
  separate threefry draws, numpy about a second for the same distribution.
  """
  rng = np.random.default_rng(seed)
  flat = {}
  for path, shape in expected_shapes().items():
    if path[-1] == "kernel":
      flat[path] = _he_truncated_normal(rng, shape)
    elif path[-1] in ("scale", "var"):
      flat[path] = np.ones(shape, np.float32)
    else:  # bias, mean
      flat[path] = np.zeros(shape, np.float32)
  return params_tree.unflatten(flat)


def _he_truncated_normal(rng, shape):
  """variance_scaling(2, 'fan_in', 'truncated_normal') of an HWIO kernel: N(0, 1) cut at
  +-2 (redrawn), scaled to variance 2 / fan_in (the 0.8796 undoes the cut's shrinkage)."""
  z = rng.standard_normal(int(np.prod(shape)))
  while True:
    out = np.abs(z) > 2.0
    if not out.any():
      break
    z[out] = rng.standard_normal(int(out.sum()))
  fan_in = int(np.prod(shape[:-1]))
  std = np.sqrt(2.0 / fan_in) / 0.87962566103423978
  return (z * std).astype(np.float32).reshape(shape)


@functools.lru_cache(maxsize=None)
def _expected_shapes() -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  x = jax.ShapeDtypeStruct((1, _MIN_SIZE, _MIN_SIZE, 3), jnp.float32)
  abstract = jax.eval_shape(FIDInceptionV3(image_size=None).init, jax.random.PRNGKey(0), x)
  return params_tree.shape_tree(abstract)


def expected_shapes() -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  """{('params' | 'batch_stats', module..., leaf): shape} of the module's variables."""
  return dict(_expected_shapes())


def tree_problems(expected: Dict[Tuple[str, ...], Tuple[int, ...]],
                  got: Dict[Tuple[str, ...], Tuple[int, ...]],
                  name=params_tree.path_str, limit: int = 8) -> Sequence[str]:
  """The first ``limit`` missing, unexpected and mis-shaped keys of ``got`` against
  ``expected`` (each one line; empty when they agree); ``name`` renders a path."""
  missing = [p for p in expected if p not in got]
  unexpected = [p for p in got if p not in expected]
  mismatched = [p for p in expected if p in got and tuple(got[p]) != tuple(expected[p])]
  lines = []
  for what, paths, show in (
      ("missing", missing, lambda p: f"{name(p)} {tuple(expected[p])}"),
      ("unexpected", unexpected, lambda p: f"{name(p)} {tuple(got[p])}"),
      ("wrong shape", mismatched,
       lambda p: f"{name(p)}: expected {tuple(expected[p])}, got {tuple(got[p])}")):
    if paths:
      more = f" (first {limit})" if len(paths) > limit else ""
      lines.append(f"{len(paths)} {what}{more}: " + "; ".join(show(p) for p in paths[:limit]))
  return lines


def check_params_file(path: str) -> None:
  """Checks a file written by ``python -m fgm_jax.convert.inception`` from its header alone
  (format and every shape), without reading the 95 MB of weights.

  Raises InceptionWeightsNotFoundError for a missing file and params_tree.ConversionError for a
  file that is not converted FID Inception weights (naming the first mismatching keys).
  """
  import safetensors

  path = os.fspath(path)
  if not os.path.isfile(path):
    raise InceptionWeightsNotFoundError(_missing_weights_message(path))
  try:
    with safetensors.safe_open(path, framework="numpy") as f:
      meta = f.metadata() or {}
      shapes = {tuple(k.split("/")): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
  except Exception as e:  # safetensors raises its own error types for non-safetensors bytes
    raise params_tree.ConversionError(
        f"{path} is not a safetensors file ({type(e).__name__}: {e}). If it is pytorch-fid's "
        f"{FID_WEIGHTS_NAME}, convert it first: {CONVERT_COMMAND}") from None
  if meta.get("format", FORMAT) != FORMAT:
    raise params_tree.ConversionError(
        f"{path} holds {meta['format']!r}, not FID Inception weights ({FORMAT!r}); convert "
        f"pytorch-fid's {FID_WEIGHTS_NAME} with: {CONVERT_COMMAND}")
  problems = tree_problems(expected_shapes(), shapes)
  if problems:
    raise params_tree.ConversionError(
        f"{path} does not match the FID Inception-V3: " + " | ".join(problems)
        + f". Re-convert pytorch-fid's {FID_WEIGHTS_NAME} with: {CONVERT_COMMAND}")


def load_params(path: str) -> Dict[str, Any]:
  """Variables from a file written by ``python -m fgm_jax.convert.inception``, checked first
  by ``check_params_file`` (same errors)."""
  import safetensors.numpy

  check_params_file(path)
  flat = safetensors.numpy.load_file(os.fspath(path))
  return params_tree.unflatten({tuple(k.split("/")): np.asarray(v, np.float32)
                           for k, v in flat.items()})
