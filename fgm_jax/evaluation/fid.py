"""FID as the field computes it: uint8 images -> Inception-V3 pool features -> Fréchet distance.

    extractor = fid.FeatureExtractor(inception_params, sharding)       # all devices
    stats = extractor.stats(fid.quantize(samples))                     # float64 mu, sigma
    reference = fid.load_reference("cifar10-32x32.npz")                # or reference_from_tfds
    fid.fid(stats, reference)

Conventions that move FID by more than the differences papers report, fixed here:

* Samples are quantised to uint8 before features are taken, as every published pipeline
  saves PNGs first. 'round' (default) is EDM's / StyleGAN's ``x * 127.5 + 128`` clipped and
  floored (round half up of the [0, 255] value); 'truncate' is score_sde's / RectifiedFlow's
  ``clip((x + 1) / 2 * 255)`` floored, which their own FIDs used.
* The network is pytorch-fid's FID Inception (``inception.py``), bilinear resize to 299 without
  antialiasing, 2048-d pool3 features.
* Statistics in float64; covariance unbiased (N - 1), as ``np.cov``; the distance is
  ``frechet.frechet_distance`` (checked against pytorch-fid's in tests/unit/test_fid.py).
* Reference statistics are an ``.npz`` with ``mu`` (2048,) and ``sigma`` (2048, 2048), the
  format pytorch-fid writes (``--save-stats``) and EDM publishes (``cifar10-32x32.npz``), or
  are computed here from a tfds split and cached in the same format.
"""

import os

import jax
import numpy as np
from absl import logging

from fgm_jax import config_checks
from fgm_jax import sharding as sharding_lib
from fgm_jax import paths
from fgm_jax.evaluation import frechet
from fgm_jax.evaluation import inception
from fgm_jax.train import sampling

QUANTIZERS = ("round", "truncate")
FEATURE_DIM = 2048


class ReferenceStatsError(config_checks.ConfigError):
  """Reference statistics that cannot be compared with Inception pool features (a user
  error: main prints it as one line)."""


def quantize(x, mode: str = "round") -> np.ndarray:
  """Images in [-1, 1] (NHWC, float) -> uint8, as the published FID pipelines save them."""
  x = np.asarray(x, np.float32)
  if mode == "round":
    y = x * 127.5 + 128.0
  elif mode == "truncate":
    y = (x + 1.0) / 2.0 * 255.0
  else:
    raise ValueError(f"quantize mode {mode!r}: expected one of {QUANTIZERS}.")
  return np.floor(np.clip(y, 0.0, 255.0)).astype(np.uint8)


class FeatureStats:
  """Running mean and covariance of feature rows, in float64.

  Sums are taken about a shift (the first batch's mean) so that the covariance does not lose
  digits to a large common mean; the result equals ``np.cov(all_rows, rowvar=False)``.
  """

  def __init__(self, dim: int = FEATURE_DIM):
    self.dim = dim
    self.n = 0
    self.shift = None
    self.sum = np.zeros(dim, np.float64)
    self.outer = np.zeros((dim, dim), np.float64)

  def update(self, features) -> None:
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[1] != self.dim:
      raise ValueError(f"features must be (N, {self.dim}), got {f.shape}.")
    if not len(f):
      return
    if self.shift is None:
      self.shift = f.mean(axis=0)
    d = f - self.shift
    self.n += len(f)
    self.sum += d.sum(axis=0)
    self.outer += d.T @ d

  def mu_sigma(self):
    if self.n < 2:
      raise ValueError(f"FID statistics need at least 2 images, got {self.n}.")
    mean_d = self.sum / self.n
    sigma = (self.outer - self.n * np.outer(mean_d, mean_d)) / (self.n - 1)
    return self.shift + mean_d, sigma


def fid(stats, reference) -> float:
  """Fréchet distance between two (mu, sigma) pairs."""
  (mu1, sigma1), (mu2, sigma2) = stats, reference
  return frechet.frechet_distance(mu1, sigma1, mu2, sigma2)


def check_reference(mu, sigma, source: str, dim: int = FEATURE_DIM):
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  if mu.shape != (dim,) or sigma.shape != (dim, dim):
    raise ReferenceStatsError(
        f"reference statistics {source}: mu {mu.shape}, sigma {sigma.shape}; Inception pool "
        f"features need mu ({dim},) and sigma ({dim}, {dim}). Use statistics of 2048-d pool3 "
        "features (pytorch-fid's default dims, EDM's published .npz), or leave "
        "config.eval.fid.reference unset to compute them from the dataset.")
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
    raise ReferenceStatsError(f"reference statistics {source} hold non-finite values.")
  return mu, sigma


def load_reference(path: str, dim: int = FEATURE_DIM):
  """(mu, sigma) from an .npz with keys 'mu' and 'sigma'."""
  if not paths.is_file(path):
    raise FileNotFoundError(
        f"reference statistics {path!r} do not exist. Give an .npz with 'mu' and 'sigma' "
        "(e.g. EDM's cifar10-32x32.npz or pytorch-fid --save-stats output), or leave "
        "config.eval.fid.reference unset to compute them from the tfds dataset.")
  f = paths.load_npz(path)
  missing = [k for k in ("mu", "sigma") if k not in f]
  if missing:
    raise ReferenceStatsError(
        f"reference statistics {path!r} lack {missing} (keys: {list(f)}); expected an .npz "
        "with 'mu' and 'sigma'.")
  return check_reference(f["mu"], f["sigma"], repr(path), dim)


def save_stats(path: str, mu, sigma, **meta) -> None:
  """Writes (mu, sigma) in the reference format, atomically, with optional scalar metadata."""
  paths.save_npz(path, mu=mu, sigma=sigma, **{k: np.asarray(v) for k, v in meta.items()})


class FeatureExtractor:
  """Inception pool features of uint8 images, in global batches over the run's devices.

  ``sharding`` is the run's ``sharding_lib.ShardingContext``: images are split over its batch axes,
  the Inception weights replicated; every process sees all features (they are small).
  """

  def __init__(self, params, sharding, batch_size: int = 500, image_size: int = 299):
    self.params = jax.device_put(params, sharding.replicated())
    self.devices = sharding_lib.batch_device_count(sharding.mesh)
    self.batch_size = max(self.devices, batch_size - batch_size % self.devices)
    self.image_size = image_size
    # The module-level function (not a fresh closure) lets every extractor of a process share
    # one compiled executable per shape: the training-time FID and job=evaluate compile once.
    self._features = sharding.jit(inception.pool_features, static_argnums=2,
                                  in_shardings=(sharding.replicated(), sharding.batch()),
                                  out_shardings=sharding.replicated())

  def features(self, images_uint8, what: str = "FID features") -> np.ndarray:
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"FID needs uint8 NHWC RGB images, got {images.dtype} {images.shape}.")
    run = lambda x: self._features(self.params, x, self.image_size)
    return sampling.draw(run, images, self.batch_size, self.devices, what=what)

  def stats(self, images_uint8, what: str = "FID features"):
    acc = FeatureStats()
    acc.update(self.features(images_uint8, what))
    return acc.mu_sigma()


def reference_from_tfds(extractor: FeatureExtractor, data_config, split: str, cache_dir: str):
  """(mu, sigma) of a tfds split's images, computed once and cached as an .npz."""
  from fgm_jax.data import tfds_images
  name = f"fid_stats_{data_config.tfds_name}_{split.replace('[', '_').replace(':', '-')}"
  path = os.path.join(cache_dir, name.rstrip("]") + ".npz")
  if paths.is_file(path):
    logging.info("FID reference statistics from the cache %s", path)
    return load_reference(path)
  images, _ = tfds_images.load_arrays(
      data_config.tfds_name, split=split, data_dir=data_config.data_dir,
      manual_dir=data_config.manual_dir, image_key=data_config.image_key)
  if images.shape[-1] == 1:  # grey data sets: Inception wants RGB
    images = np.repeat(images, 3, axis=-1)
  mu, sigma = extractor.stats(images, what=f"FID reference {data_config.tfds_name}[{split}]")
  if jax.process_index() == 0:
    paths.makedirs(cache_dir)
    save_stats(path, mu, sigma, num_images=len(images))
    logging.info("cached FID reference statistics of %d images in %s", len(images), path)
  return mu, sigma
