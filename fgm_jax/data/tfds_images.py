"""TensorFlow Datasets image sets (CIFAR-10 first) held in memory as uint8.

Config fields (config.data, all read; configs/cifar10_teacher.data_config() gives CIFAR-10's):
  name='tfds', tfds_name='cifar10', split='train',
  data_dir=None (tfds's default, ~/tensorflow_datasets or $TFDS_DATA_DIR),
  manual_dir=None (a folder holding the dataset's source archives; see below),
  random_flip=True (CIFAR-10 is left-right symmetric), image_key='image', label_key=None.

The whole split is read once into a uint8 array (CIFAR-10 train: 150 MB) and sampled by
`arrays.ArraySource`, which makes every batch a pure function of (seed, step) and gives
each process its rows of the global batch.

Nothing is ever downloaded implicitly. A dataset that is not prepared raises
`DatasetNotFoundError` explaining how to prepare it. With `manual_dir` set, the dataset is
prepared locally from the archives in that folder, and only once every archive tfds would
fetch is found there.

TensorFlow and tfds are imported inside the functions, so toy runs never load them.
"""

import os

import numpy as np

from fgm_jax.data import arrays


class DatasetNotFoundError(FileNotFoundError):
  """A tfds dataset is not prepared where we looked, and we will not download it."""


def _archives(builder) -> list:
  """File names of the source archives tfds would fetch for this builder (may be empty)."""
  return sorted({info.filename for info in (builder.url_infos or {}).values() if info.filename})


def _how_to_prepare(builder, name: str) -> str:
  archives = _archives(builder)
  archive_text = f" ({', '.join(archives)})" if archives else ""
  return (
      "fgm_jax never downloads data by itself. To prepare it, either:\n"
      "  1. on a machine with internet run\n"
      f"       python -c \"import tensorflow_datasets as tfds; "
      f"tfds.builder('{name}').download_and_prepare()\"\n"
      f"     then copy ~/tensorflow_datasets/{name} into "
      f"{os.fspath(builder.data_dir_root)!r}, or pass "
      "--config.data.data_dir=<folder that contains it>;\n"
      f"  2. or put the dataset's source archives{archive_text} in a folder and pass "
      "--config.data.manual_dir=<that folder>: it is then prepared here from those files.")


def _not_prepared(builder, name: str, split: str) -> DatasetNotFoundError:
  return DatasetNotFoundError(
      f"tfds dataset {name!r} (split {split!r}) is not prepared in data_dir "
      f"{os.fspath(builder.data_dir_root)!r} (looked for {os.fspath(builder.data_path)!r}).\n"
      + _how_to_prepare(builder, name))


def _hide_gpus_from_tf(tf):
  # TF would otherwise reserve accelerator memory that JAX needs; we only read files.
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # devices already initialised by someone else; harmless
    pass


def _prepare_from_manual_dir(builder, name: str, manual_dir: str):
  """download_and_prepare from local archives, refusing if any archive would be fetched."""
  import tensorflow_datasets as tfds
  manual = os.path.expanduser(manual_dir)
  if not os.path.isdir(manual):
    raise DatasetNotFoundError(
        f"config.data.manual_dir={manual_dir!r} is not a folder.\n"
        + _how_to_prepare(builder, name))
  # The download manager takes a file from manual_dir when its name matches the archive's
  # registered name; a missing one would be downloaded, so stop before that happens.
  expected = _archives(builder)
  missing = [f for f in expected if not os.path.exists(os.path.join(manual, f))]
  if missing:
    raise DatasetNotFoundError(
        f"tfds dataset {name!r}: config.data.manual_dir={manual_dir!r} lacks {missing}; "
        f"it must hold {expected}.\n" + _how_to_prepare(builder, name))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual))


def load_arrays(tfds_name: str, split: str = "train", data_dir=None, manual_dir=None,
                image_key: str = "image", label_key=None):
  """Reads a prepared split into memory: (uint8 images NHWC, labels or None)."""
  import tensorflow as tf
  import tensorflow_datasets as tfds
  _hide_gpus_from_tf(tf)

  builder = tfds.builder(tfds_name, data_dir=data_dir)
  if manual_dir and not builder.is_prepared():
    _prepare_from_manual_dir(builder, tfds_name, manual_dir)
  try:
    ds = builder.as_dataset(split=split, shuffle_files=False)
  except AssertionError as e:
    # tfds signals "no data here" with an AssertionError; anything else is not ours.
    if builder.is_prepared():
      raise
    raise _not_prepared(builder, tfds_name, split) from e

  keys = [image_key] + ([label_key] if label_key else [])
  missing = [k for k in keys if k not in builder.info.features]
  if missing:
    raise ValueError(
        f"config.data image_key/label_key {missing} not in {tfds_name!r} features "
        f"{list(builder.info.features)}.")
  # Batch in chunks rather than batch_size=-1: same result without one giant padded batch.
  ds = ds.map(lambda ex: {k: ex[k] for k in keys}).batch(4096)
  chunks = list(tfds.as_numpy(ds))
  if not chunks:
    raise ValueError(f"tfds dataset {tfds_name!r} split {split!r} is empty.")
  images = np.concatenate([c[image_key] for c in chunks])
  if images.dtype != np.uint8:
    raise ValueError(f"{tfds_name!r}[{image_key!r}] has dtype {images.dtype}; expected uint8.")
  if images.ndim == 3:  # grey images stored without a channel axis
    images = images[..., None]
  labels = np.concatenate([c[label_key] for c in chunks]) if label_key else None
  return images, labels


def from_config(data_config, seed: int) -> arrays.ArraySource:
  if not data_config.tfds_name:
    raise ValueError("config.data.tfds_name must name a tfds dataset, e.g. 'cifar10'.")
  images, labels = load_arrays(
      data_config.tfds_name, split=data_config.split, data_dir=data_config.data_dir,
      manual_dir=data_config.manual_dir, image_key=data_config.image_key,
      label_key=data_config.label_key)
  return arrays.ArraySource(images, seed, max_value=255.0,
                            random_flip=bool(data_config.random_flip), labels=labels)
