"""Toy 2-D distributions, generated on the fly and keyed by (seed, step)."""

import numpy as np

SCALE = 2.0  # the usual toy scale; data lives roughly in [-4, 4]²


def eight_gaussians(rng, n):
  angles = 2 * np.pi * rng.integers(0, 8, n) / 8
  centers = np.stack([np.cos(angles), np.sin(angles)], axis=1) * SCALE
  return centers + 0.2 * rng.standard_normal((n, 2))


def twentyfive_gaussians(rng, n):
  grid = np.arange(-2, 3)
  ij = rng.integers(0, 5, (n, 2))
  return grid[ij] * SCALE / 2 + 0.05 * SCALE * rng.standard_normal((n, 2))


def checkerboard(rng, n):
  x1 = rng.uniform(-2, 2, n)
  x2 = rng.uniform(0, 1, n) + rng.integers(0, 2, n) * 2 - 2  # in [-2, -1) or [0, 1)
  x2 = x2 + np.floor(x1) % 2  # shift every other column up by one
  return np.stack([x1, x2], axis=1) * SCALE


def two_moons(rng, n):
  which = rng.integers(0, 2, n)
  angle = rng.uniform(0, np.pi, n)
  x = np.where(which == 0, np.cos(angle), 1 - np.cos(angle))
  y = np.where(which == 0, np.sin(angle), 0.5 - np.sin(angle))
  pts = np.stack([x - 0.5, y - 0.25], axis=1) * SCALE
  return pts + 0.05 * SCALE * rng.standard_normal((n, 2))


DISTRIBUTIONS = {
    "8gaussians": eight_gaussians,
    "25gaussians": twentyfive_gaussians,
    "checkerboard": checkerboard,
    "moons": two_moons,
}


def sample(distribution: str, n: int, seed) -> np.ndarray:
  """n points of a named distribution from a numpy Generator seeded with ``seed``."""
  if distribution not in DISTRIBUTIONS:
    raise ValueError(f"config.data.distribution={distribution!r} is not a toy distribution; "
                     f"choose one of {sorted(DISTRIBUTIONS)}.")
  return DISTRIBUTIONS[distribution](np.random.default_rng(seed), n).astype(np.float32)


class Toy2D:
  """Infinite stream of fresh samples; batch(step) depends only on (seed, step)."""

  shape = (2,)

  def __init__(self, distribution: str, seed: int):
    sample(distribution, 1, 0)  # validates the name up front
    self.distribution = distribution
    self.seed = seed

  def batch(self, step, global_batch, process_index=0, process_count=1):
    if global_batch % process_count:
      raise ValueError(f"global batch {global_batch} is not divisible by the process count "
                       f"{process_count}; change config.batch_size.")
    full = sample(self.distribution, global_batch, (self.seed, step))
    n = global_batch // process_count
    return full[process_index * n:(process_index + 1) * n]

  def reference(self, n: int, seed: int = 12345):
    """Fresh samples for evaluation, independent of the training stream."""
    return sample(self.distribution, n, (seed, 2**31 - 1))


def from_config(data_config, seed: int):
  return Toy2D(data_config.distribution, seed)


def example_shape(data_config):
  del data_config
  return Toy2D.shape


def check_config(data_config):
  if data_config.distribution not in DISTRIBUTIONS:
    return (f"data.distribution={data_config.distribution!r} is not a toy distribution; "
            f"choose one of {sorted(DISTRIBUTIONS)}.")
  return None
