"""scikit-learn's bundled 8x8 handwritten digits as an image source.

1,797 grey images with values 0..16, scaled to [-1, 1] and shaped (8, 8, 1). The split is
FIXED and independent of the run seed (a permutation drawn with its own constant seed):
'test' (also called 'heldout') holds 297 images, 'train' the other 1,500. Teachers and
generators train on 'train'; the digits metric compares against 'test'.

Config fields (config.data): name='digits', split='train', random_flip=False (digits are
not left-right symmetric, so flipping would teach the model mirrored digits).
"""

import functools

import numpy as np

from fgm_jax.data import arrays

NUM_HELDOUT = 297
NUM_TRAIN = 1500
SHAPE = (8, 8, 1)
MAX_VALUE = 16.0
# Constant so every run, seed and metric agrees on which images are held out.
_SPLIT_SEED = 20240607
_SPLIT_ALIASES = {"train": "train", "test": "test", "heldout": "test"}


@functools.lru_cache(maxsize=1)
def _raw():
  from sklearn.datasets import load_digits  # only needed by digits runs
  bunch = load_digits()
  images = bunch.images.astype(np.float32).reshape(-1, *SHAPE)
  labels = bunch.target.astype(np.int32)
  return images, labels


def _split_indices(split: str) -> np.ndarray:
  if split not in _SPLIT_ALIASES:
    raise ValueError(
        f"config.data.split={split!r} is not a digits split; use 'train' or 'test' "
        "('heldout' is accepted for 'test').")
  n = NUM_HELDOUT + NUM_TRAIN
  perm = np.random.default_rng(_SPLIT_SEED).permutation(n)
  heldout = np.sort(perm[:NUM_HELDOUT])
  train = np.sort(perm[NUM_HELDOUT:])
  return heldout if _SPLIT_ALIASES[split] == "test" else train


def _split_raw(split: str):
  """Images in 0..16 (float32, NHWC) and int32 labels of one split."""
  images, labels = _raw()
  if len(images) != NUM_HELDOUT + NUM_TRAIN:
    raise RuntimeError(f"expected 1797 digits from scikit-learn, got {len(images)}.")
  idx = _split_indices(split)
  return images[idx], labels[idx]


def load_split(split: str):
  """(images, labels) of a split: float32 (N, 8, 8, 1) in [-1, 1], int32 (N,)."""
  images, labels = _split_raw(split)
  return images * (2.0 / MAX_VALUE) - 1.0, labels


def from_config(data_config, seed: int) -> arrays.ArraySource:
  images, labels = _split_raw(data_config.split)
  return arrays.ArraySource(
      images, seed, max_value=MAX_VALUE,
      random_flip=bool(data_config.random_flip), labels=labels)
