"""Fréchet distance between Gaussians fitted to feature sets (the quantity behind FID).

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

Computed in float64 on the host; feature dimensions here are at most a few thousand.
"""

import warnings

import numpy as np
import scipy.linalg


def feature_stats(features):
  """Mean and (unbiased, N - 1) covariance of an (N, D) feature array."""
  f = np.asarray(features, dtype=np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"features must be (N >= 2, D), got shape {f.shape}.")
  return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _sqrtm_product(sigma1, sigma2):
  """sqrtm(sigma1 @ sigma2) and its relative error ||X X - A||_F / ||A||_F."""
  a = sigma1 @ sigma2
  # Singular products are common and judged by the error estimate below instead.
  with warnings.catch_warnings(), np.errstate(all="ignore"):
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    x = scipy.linalg.sqrtm(a)
    err = np.linalg.norm(x @ x - a) / max(np.linalg.norm(a), np.finfo(np.float64).tiny)
  return x, err


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(
        f"shape mismatch: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {sigma1.shape}, "
        f"sigma2 {sigma2.shape}.")

  covmean, err = _sqrtm_product(sigma1, sigma2)
  if not np.all(np.isfinite(covmean)) or not err < 1e-5:
    # Singular product (fewer samples than dimensions, dead features): nudge both
    # covariances off singularity, the usual remedy, which moves FD by O(eps * D).
    offset = np.eye(sigma1.shape[0]) * eps
    covmean, _ = _sqrtm_product(sigma1 + offset, sigma2 + offset)
  if np.iscomplexobj(covmean):
    # Round-off gives the square root of a real PSD-like product tiny imaginary parts.
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(
          f"sqrtm(sigma1 @ sigma2) has imaginary diagonal up to "
          f"{np.max(np.abs(np.diagonal(covmean).imag)):.3g}; covariances are not valid.")
    covmean = covmean.real

  diff = mu1 - mu2
  fd = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
  return float(fd)
