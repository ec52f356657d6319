"""Fréchet distance between Gaussians fitted to feature sets (the quantity behind FID).

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

Computed in float64 on the host; feature dimensions here are at most a few thousand.
"""

import numpy as np


def feature_stats(features):
  """Mean and (unbiased, N - 1) covariance of an (N, D) feature array."""
  f = np.asarray(features, dtype=np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"features must be (N >= 2, D), got shape {f.shape}.")
  return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def trace_sqrt_product(sigma1, sigma2) -> float:
  """tr((S1 S2)^(1/2)) for covariances S1, S2 (symmetric PSD), from eigenvalues.

  S1 S2 is similar to R S2 R with R = S1^(1/2) (symmetric PSD), so its square root's trace is
  the sum of square roots of R S2 R's eigenvalues. Two symmetric eigendecompositions instead
  of scipy's general sqrtm: ~10x faster at D = 2048, and exact for singular (rank-deficient)
  covariances without the usual eps offset. Round-off negatives are clipped to 0.
  """
  lam, u = np.linalg.eigh((sigma1 + sigma1.T) / 2)
  root = (u * np.sqrt(np.clip(lam, 0.0, None))) @ u.T
  m = root @ sigma2 @ root
  return float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None))))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(
        f"shape mismatch: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {sigma1.shape}, "
        f"sigma2 {sigma2.shape}.")
  if not (np.all(np.isfinite(sigma1)) and np.all(np.isfinite(sigma2))):
    raise ValueError("covariances hold non-finite values; the features are not valid.")
  diff = mu1 - mu2
  fd = (diff @ diff + np.trace(sigma1) + np.trace(sigma2)
        - 2.0 * trace_sqrt_product(sigma1, sigma2))
  return float(fd)
