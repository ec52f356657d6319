"""FID pieces against independent references: pytorch-fid's Fréchet distance, np.cov, the
published quantisation formulas, and a 1-device evaluation for the sharded one.

The Inception network itself is checked against pytorch-fid in test_inception_parity.py; here
its random-weight instance only feeds the sharding and caching checks, at image_size 75 (the
smallest Inception-V3 takes) to keep them cheap.
"""

import os

import jax
import numpy as np
import pytest

from fgm_jax import config_checks
from fgm_jax import sharding as sharding_lib
from fgm_jax.evaluation import fid
from fgm_jax.evaluation import inception

SMALL = 75  # Inception's minimum input size: the sharding/caching tests don't need 299


def _stats(rng, dim, n, scale=1.0, offset=0.0):
  f = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) * scale + offset
  return f.mean(0), np.cov(f, rowvar=False)


@pytest.mark.parametrize("n_samples", [400, 40], ids=["well_conditioned", "near_singular"])
def test_frechet_distance_equals_pytorch_fid(n_samples):
  pytest.importorskip("pytorch_fid")
  from pytorch_fid.fid_score import calculate_frechet_distance
  rng = np.random.default_rng(0)
  dim = 64  # 40 samples in 64 dims: rank-39 covariances, the case FID-with-few-samples hits
  mu1, s1 = _stats(rng, dim, n_samples)
  mu2, s2 = _stats(rng, dim, n_samples, scale=1.1, offset=0.2)
  ours = fid.fid((mu1, s1), (mu2, s2))
  theirs = float(calculate_frechet_distance(mu1, s1, mu2, s2))
  assert abs(ours - theirs) <= 1e-6 * abs(theirs), (ours, theirs)


def test_feature_stats_streamed_equal_np_cov():
  rng = np.random.default_rng(1)
  # A large common mean (Inception features are non-negative) must not cost digits.
  f = (rng.normal(size=(257, 16)) * 0.01 + 50.0).astype(np.float32).astype(np.float64)
  acc = fid.FeatureStats(dim=16)
  for part in np.array_split(f, [3, 100, 101, 200]):
    acc.update(part)
  mu, sigma = acc.mu_sigma()
  np.testing.assert_allclose(mu, f.mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), rtol=1e-6, atol=1e-14)


def test_quantize_follows_the_published_formulas():
  x = np.array([-1.5, -1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 1.2], np.float32)
  # EDM / StyleGAN: (x * 127.5 + 128).clip(0, 255).to(uint8), i.e. floored after the +128.
  edm = np.clip(x * 127.5 + 128, 0, 255).astype(np.uint8)
  # score_sde / RectifiedFlow: np.clip((x + 1) / 2 * 255, 0, 255).astype(np.uint8).
  rf = np.clip((x + 1) / 2 * 255, 0, 255).astype(np.uint8)
  np.testing.assert_array_equal(fid.quantize(x, "round"), edm)
  np.testing.assert_array_equal(fid.quantize(x, "truncate"), rf)
  assert fid.quantize(np.float32(0.0), "round") == 128  # round half up of 127.5
  assert fid.quantize(np.float32(0.0), "truncate") == 127
  with pytest.raises(ValueError, match="quantize mode"):
    fid.quantize(x, "nearest")


def test_reference_file_problems_are_named(tmp_path):
  wrong = tmp_path / "wrong.npz"
  np.savez(wrong, mu=np.zeros(64), sigma=np.eye(64))
  with pytest.raises(fid.ReferenceStatsError, match=r"mu \(64,\).*2048"):
    fid.load_reference(str(wrong))
  keys = tmp_path / "keys.npz"
  np.savez(keys, mean=np.zeros(2048))
  with pytest.raises(fid.ReferenceStatsError, match=r"lack \['mu', 'sigma'\]"):
    fid.load_reference(str(keys))
  with pytest.raises(FileNotFoundError, match="do not exist"):
    fid.load_reference(str(tmp_path / "absent.npz"))


@pytest.fixture(scope="module")
def random_inception():
  return inception.init_params(0)


def _extractor(variables, devices, batch_size=8):
  mesh = sharding_lib.make_mesh(data=len(devices), devices=devices)
  return fid.FeatureExtractor(variables, sharding_lib.ShardingContext(mesh), batch_size, SMALL)


@pytest.fixture(scope="module")
def eight_devices(random_inception):
  """Compiled once for 24-image batches (3 rows per device), shared by the tests below."""
  return _extractor(random_inception, jax.devices(), batch_size=24)


def test_sharded_statistics_equal_one_device(random_inception, eight_devices):
  assert jax.device_count() == 8
  images = np.random.default_rng(2).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
  # Same rows per device in both (3): XLA's CPU convolutions pick kernels by batch size, which
  # alone moves features by ~1e-6 and is not what this test is about.
  one = _extractor(random_inception, jax.devices()[:1], batch_size=3).stats(images)
  eight = eight_devices.stats(images)
  for a, b in zip(one, eight):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6 * np.abs(a).max())


def test_reference_from_tfds_is_cached(tmp_path, eight_devices, monkeypatch):
  import tensorflow_datasets as tfds
  from fgm_jax.data import tfds_images
  from configs import cifar10_teacher
  data = cifar10_teacher.data_config()
  extractor = eight_devices
  with tfds.testing.mock_data(num_examples=24):
    mu, sigma = fid.reference_from_tfds(extractor, data, "train", str(tmp_path))
    images, _ = tfds_images.load_arrays("cifar10", "train")
  np.testing.assert_allclose(mu, extractor.features(images).mean(0), rtol=1e-5, atol=1e-7)
  assert sigma.shape == (2048, 2048)
  cached = [f for f in os.listdir(tmp_path) if f.endswith(".npz")]
  assert cached == ["fid_stats_cifar10_train.npz"]

  def no_data(*args, **kwargs):
    raise AssertionError("the cached statistics should have been used")
  monkeypatch.setattr(tfds_images, "load_arrays", no_data)
  mu2, sigma2 = fid.reference_from_tfds(extractor, data, "train", str(tmp_path))
  np.testing.assert_array_equal(mu2, mu)
  np.testing.assert_array_equal(sigma2, sigma)


def _cifar_eval_config(tmp_path, **fid_fields):
  from configs import cifar10_fgm
  config = cifar10_fgm.get_config("runlocal")
  config.job = "evaluate"
  config.teacher.workdir = str(tmp_path / "teacher")
  config.eval.fid.update(fid_fields)
  return config


def test_evaluate_stops_before_compiling_on_bad_fid_inputs(tmp_path, random_inception):
  from fgm_jax.convert import inception as convert
  from fgm_jax.evaluation import evaluate
  workdir = str(tmp_path / "fgm")  # no checkpoint: each check must fire before the restore
  with pytest.raises(config_checks.ConfigError, match="eval.fid.inception="):
    evaluate.evaluate(_cifar_eval_config(tmp_path), workdir)
  with pytest.raises(inception.InceptionWeightsNotFoundError,
                     match="pt_inception-2015-12-05-6726825d.pth"):
    evaluate.evaluate(_cifar_eval_config(tmp_path, inception=str(tmp_path / "none.st")),
                      workdir)
  weights = str(tmp_path / "inception_random.safetensors")
  convert.save_variables(random_inception, weights, {"official": "false"})
  wrong = tmp_path / "wrong.npz"
  np.savez(wrong, mu=np.zeros(64), sigma=np.eye(64))
  with pytest.raises(fid.ReferenceStatsError, match="2048"):
    evaluate.evaluate(_cifar_eval_config(tmp_path, inception=weights, reference=str(wrong)),
                      workdir)
  with pytest.raises(config_checks.ConfigError, match="quantize"):
    evaluate.evaluate(_cifar_eval_config(tmp_path, inception=weights, quantize="nearest"),
                      workdir)
