"""Fréchet distance against closed forms, and the digits-classifier metric."""

import os

import numpy as np
import pytest

from fgm_jax.evaluation import frechet


def _rotation(d, seed):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
  return q


def test_frechet_commuting_covariances_closed_form():
  # Shared eigenvectors: FD = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
  d = 6
  q = _rotation(d, 0)
  a = np.array([0.5, 1.0, 2.0, 3.0, 0.1, 4.0])
  b = np.array([1.5, 1.0, 0.2, 5.0, 0.1, 1.0])
  mu1, mu2 = np.arange(d, dtype=float), np.ones(d)
  s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert frechet.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
  assert frechet.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-9)
  assert frechet.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_one_dimensional_and_singular():
  # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s.
  assert frechet.frechet_distance([1.0], [[4.0]], [-1.0], [[9.0]]) == pytest.approx(5.0)
  # Rank-deficient covariances (zero-variance features) still give the closed form.
  a, b = np.array([0.0, 1.0, 4.0]), np.array([0.0, 0.0, 1.0])
  fd = frechet.frechet_distance(np.zeros(3), np.diag(a), np.zeros(3), np.diag(b))
  assert fd == pytest.approx(np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), abs=1e-4)
  with pytest.raises(ValueError, match="shape"):
    frechet.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_feature_stats_recover_gaussian():
  rng = np.random.default_rng(0)
  q = _rotation(4, 1)
  cov = q @ np.diag([0.5, 1.0, 2.0, 3.0]) @ q.T
  x = rng.multivariate_normal(np.ones(4), cov, size=20000)
  mu, sigma = frechet.feature_stats(x)
  np.testing.assert_allclose(mu, np.ones(4), atol=0.05)
  np.testing.assert_allclose(sigma, cov, atol=0.1)
  assert frechet.frechet_distance(mu, sigma, np.ones(4), cov) < 0.01
  with pytest.raises(ValueError, match="features"):
    frechet.feature_stats(np.zeros((1, 4)))


# --- the digits classifier ----------------------------------------------------------------


@pytest.fixture(scope="session")
def classifier(tmp_path_factory):
  from fgm_jax.evaluation import digits_classifier as dc
  cache_dir = str(tmp_path_factory.mktemp("digits_metric"))
  lines = []
  params = dc.load_or_train(cache_dir, log=lines.append)
  return dc, cache_dir, params, lines


def test_classifier_trains_caches_and_is_accurate(classifier):
  from fgm_jax.data import digits
  dc, cache_dir, params, lines = classifier
  print("\n".join(lines))
  assert any("epoch" in l and "loss" in l and "held-out acc" in l for l in lines)
  assert os.path.exists(os.path.join(cache_dir, dc.CACHE_NAME))
  test_x, test_y = digits.load_split("test")
  acc = dc.accuracy(params, test_x, test_y)
  assert acc >= 0.97, acc
  # A second call reads the cache instead of training, and gets the same weights.
  again = dc.load_or_train(cache_dir, log=lambda l: pytest.fail(f"retrained: {l}"))
  np.testing.assert_array_equal(dc.features(again, test_x), dc.features(params, test_x))


def test_features_shape_and_clipping(classifier):
  from fgm_jax.data import digits
  dc, _, params, _ = classifier
  x = digits.load_split("test")[0][:10]
  f = dc.features(params, x)
  assert f.shape == (10, dc.FEATURE_DIM)
  # Out-of-range samples score as their clipped versions.
  np.testing.assert_allclose(dc.features(params, 3.0 * x),
                             dc.features(params, np.clip(3.0 * x, -1, 1)), rtol=1e-5, atol=1e-5)
  assert not np.allclose(dc.features(params, 3.0 * x), f)
  np.testing.assert_allclose(dc.features(params, x[..., 0]), f, rtol=1e-5, atol=1e-5)


def test_digits_fd_orders_real_above_noise(classifier):
  from fgm_jax.data import digits
  dc, cache_dir, _, _ = classifier
  heldout = digits.load_split("test")[0]
  assert abs(dc.digits_fd(heldout, cache_dir)) < 1e-6
  floor = dc.real_floor(cache_dir)
  noise = np.random.default_rng(0).uniform(-1, 1, size=(1500, 8, 8, 1))
  fd_noise = dc.digits_fd(noise, cache_dir)
  print(f"real floor {floor:.3f}, uniform noise {fd_noise:.3f}")
  assert 0 < floor < 0.2 * fd_noise


def test_bad_cache_file_is_reported(classifier, tmp_path):
  import safetensors.numpy
  dc = classifier[0]
  path = tmp_path / dc.CACHE_NAME
  safetensors.numpy.save_file({"params/Dense_0/kernel": np.zeros((3, 3), np.float32)},
                              str(path))
  with pytest.raises(ValueError, match="Delete it to retrain"):
    dc.load_or_train(str(tmp_path))
