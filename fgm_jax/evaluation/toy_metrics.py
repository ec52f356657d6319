"""Sample-based distances between 2-D point clouds (exact estimators, no features needed)."""

import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def _pairwise_distance_sum(a, b):
  """sum_ij |a_i - b_j| in float32 chunks of rows (memory stays O(chunk * len(b)))."""
  chunk = 1024
  pad = (-a.shape[0]) % chunk
  mask = jnp.concatenate([jnp.ones(a.shape[0]), jnp.zeros(pad)]).reshape(-1, chunk)
  a = jnp.pad(a, ((0, pad), (0, 0))).reshape(-1, chunk, a.shape[1])

  def row_block(args):
    rows, m = args
    d = jnp.sqrt(jnp.maximum(jnp.sum((rows[:, None, :] - b[None]) ** 2, axis=-1), 0.0))
    return jnp.sum(d.sum(axis=1) * m)

  return jnp.sum(jax.lax.map(row_block, (a, mask)))


def energy_distance(x, y, max_points: int = 20000, seed: int = 0) -> float:
  """Energy distance 2 E|X-Y| - E|X-X'| - E|Y-Y'| (0 iff equal laws), unbiased U-statistic.

  Uses at most ``max_points`` points per side (quadratic cost; 20k x 20k takes seconds).
  """
  rng = np.random.default_rng(seed)
  x = np.asarray(x, np.float32)[rng.permutation(len(x))[:max_points]]
  y = np.asarray(y, np.float32)[rng.permutation(len(y))[:max_points]]
  n, m = len(x), len(y)
  xy = float(_pairwise_distance_sum(x, y)) / (n * m)
  xx = float(_pairwise_distance_sum(x, x)) / (n * (n - 1))  # diagonal terms are zero
  yy = float(_pairwise_distance_sum(y, y)) / (m * (m - 1))
  return 2 * xy - xx - yy


def sliced_wasserstein2(x, y, num_projections: int = 256, seed: int = 0) -> float:
  """Sliced W2: sqrt of the mean over random directions of the 1-D W2² (sorted quantiles)."""
  rng = np.random.default_rng(seed)
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  n = min(len(x), len(y))
  x, y = x[rng.permutation(len(x))[:n]], y[rng.permutation(len(y))[:n]]
  dirs = rng.standard_normal((num_projections, x.shape[1]))
  dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
  px, py = np.sort(x @ dirs.T, axis=0), np.sort(y @ dirs.T, axis=0)
  return float(np.sqrt(np.mean((px - py) ** 2)))
