"""Sample sets: named draws from a teacher's ODE or a one-step generator, same noise per seed."""

import dataclasses

import jax
import numpy as np

from fgm_jax import distributed
from fgm_jax import progress


@dataclasses.dataclass(frozen=True)
class SampleSet:
  """Samples with their names: ``key`` for files (eval.json), ``label`` for people."""
  key: str  # e.g. 'teacher_euler_4step', 'fgm_1step'
  label: str  # e.g. 'teacher 4-step euler', 'FGM 1-step'
  x: np.ndarray


def teacher_set(method: str, steps: int, x) -> SampleSet:
  return SampleSet(f"teacher_{method}_{steps}step", f"teacher {steps}-step {method}", x)


def generator_set(x) -> SampleSet:
  return SampleSet("fgm_1step", "FGM 1-step", x)


def noise(n: int, shape, seed: int) -> np.ndarray:
  """The same starting noise for every sampler with the same seed (fair comparisons)."""
  return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (n,) + tuple(shape)))


def draw(fn, z: np.ndarray, chunk: int = 4096, multiple: int = 1, what: str = "") -> np.ndarray:
  """fn over z in chunks; each chunk is zero-padded to a multiple of ``multiple`` rows (the
  data-parallel device count, which must divide a sharded batch) and trimmed back.

  With more than one chunk, each finished chunk logs progress as ``what`` (e.g. 'teacher
  50-step euler'), with rate and ETA.
  """
  meter = progress.Meter(what or "sampling", len(z), "samples", enabled=len(z) > chunk)
  out = []
  for i in range(0, len(z), chunk):
    part = z[i:i + chunk]
    pad = (-len(part)) % multiple
    if pad:
      part = np.concatenate([part, np.zeros((pad,) + part.shape[1:], part.dtype)])
    out.append(distributed.to_host(fn(part))[:len(part) - pad])
    meter.advance(len(part) - pad)
  return np.concatenate(out)
