"""Image data sources: determinism in (seed, step), process slicing, digits, tfds."""

import numpy as np
import pytest
from ml_collections import ConfigDict

from fgm_jax import data
from fgm_jax.data import arrays, digits


def _digits(seed=0, random_flip=False):
  return data.build(ConfigDict(dict(name="digits", split="train", random_flip=random_flip)),
                    seed)


def test_digits_split_sizes_range_and_disjoint():
  train_x, train_y = digits.load_split("train")
  test_x, test_y = digits.load_split("test")
  assert train_x.shape == (1500, 8, 8, 1) and test_x.shape == (297, 8, 8, 1)
  assert train_x.dtype == np.float32 and train_y.shape == (1500,)
  for x in (train_x, test_x):
    assert x.min() == -1.0 and x.max() == 1.0
  # The split is fixed: no held-out image also appears in train.
  train_rows = {r.tobytes() for r in train_x}
  overlap = sum(r.tobytes() in train_rows for r in test_x)
  assert overlap < 5  # the raw set has a handful of exact duplicates, nothing more
  assert set(np.unique(test_y)) == set(range(10))
  np.testing.assert_array_equal(digits.load_split("heldout")[0], test_x)
  with pytest.raises(ValueError, match="split"):
    digits.load_split("validation")


def test_batch_is_deterministic_in_seed_and_step():
  a, b = _digits(seed=3), _digits(seed=3)
  assert a.shape == (8, 8, 1)
  x = a.batch(7, 64)
  assert x.shape == (64, 8, 8, 1) and x.dtype == np.float32
  assert -1.0 <= x.min() and x.max() <= 1.0
  np.testing.assert_array_equal(x, b.batch(7, 64))
  a.batch(8, 64)  # asking other steps first changes nothing: no iterator state
  np.testing.assert_array_equal(x, a.batch(7, 64))
  assert not np.array_equal(x, a.batch(8, 64))
  assert not np.array_equal(x, _digits(seed=4).batch(7, 64))


def test_epochs_cover_every_example_once():
  src = _digits()
  n = len(src)
  per_step = 100  # 15 steps make one epoch of 1500
  seen = np.concatenate([src.batch(s, per_step) for s in range(n // per_step)])
  assert len({r.tobytes() for r in seen}) == len({r.tobytes() for r in src.batch(0, n)})
  # Next epoch is a different order of the same examples.
  assert not np.array_equal(seen[:per_step], src.batch(n // per_step, per_step))


def test_process_slices_concatenate_to_global_batch():
  src = _digits(seed=1, random_flip=True)
  for step in (0, 14, 15, 1000):  # includes a batch that straddles an epoch boundary
    full = src.batch(step, 128)
    halves = [src.batch(step, 128, process_index=p, process_count=2) for p in range(2)]
    assert halves[0].shape == (64, 8, 8, 1)
    np.testing.assert_array_equal(np.concatenate(halves), full)
    quarters = [src.batch(step, 128, p, 4) for p in range(4)]
    np.testing.assert_array_equal(np.concatenate(quarters), full)


def test_bad_process_split_names_the_field():
  with pytest.raises(ValueError, match="global_batch"):
    _digits().batch(0, 10, 0, 3)
  with pytest.raises(ValueError, match="process_index"):
    _digits().batch(0, 10, 2, 2)


def test_random_flip_is_keyed_by_step():
  base = arrays.ArraySource(np.arange(4 * 2 * 3 * 1, dtype=np.float32).reshape(4, 2, 3, 1),
                            0, max_value=23.0, random_flip=False)
  flipped = arrays.ArraySource(base.images, 0, max_value=23.0, random_flip=True)
  masks = []
  for step in range(6):
    plain, x = base.batch(step, 4), flipped.batch(step, 4)
    np.testing.assert_array_equal(x, flipped.batch(step, 4))
    is_flipped = np.all(x == plain[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(is_flipped | np.all(x == plain, axis=(1, 2, 3)))
    masks.append(is_flipped)
  masks = np.array(masks)
  assert 0 < masks.sum() < masks.size


def test_prefetch_matches_direct_batches_and_stops_its_thread():
  import threading
  src = _digits()
  gen = arrays.prefetch(src, 5, 32, process_index=1, process_count=2, depth=2)
  got = [next(gen) for _ in range(3)]
  assert [s for s, _ in got] == [5, 6, 7]
  for s, x in got:
    np.testing.assert_array_equal(x, src.batch(s, 32, 1, 2))
  gen.close()
  assert not any(t.name == "fgm_jax-prefetch" and t.is_alive() for t in threading.enumerate())
  bounded = list(arrays.prefetch(src, 0, 16, stop_step=3))
  assert [s for s, _ in bounded] == [0, 1, 2]


def test_prefetch_reraises_producer_errors():
  class Broken:
    def batch(self, step, *args):
      raise RuntimeError(f"bad step {step}")
  with pytest.raises(RuntimeError, match="bad step 0"):
    next(arrays.prefetch(Broken(), 0, 4))


def test_step_stream_follows_the_step_it_is_asked_for():
  import threading
  src = _digits()
  stream = arrays.StepStream(src, 16, process_index=0, process_count=2)
  for step in (0, 1, 2, 7, 8, 3):  # in order, then a jump ahead, then back (a resume)
    np.testing.assert_array_equal(stream(step), src.batch(step, 16, 0, 2))
  stream.close()
  assert not any(t.name == "fgm_jax-prefetch" and t.is_alive() for t in threading.enumerate())


def test_row_source_draws_pytrees_by_step_and_slices_by_process():
  rng = np.random.default_rng(0)
  rows = {"context": rng.standard_normal((10, 3, 4)), "pooled": np.arange(10.0)}
  src = arrays.RowSource(rows, seed=5)
  batch = src.batch(4, 8)
  assert batch["context"].shape == (8, 3, 4) and batch["pooled"].shape == (8,)
  # Rows stay paired across the tree's leaves (the same index picks both).
  for c, p in zip(batch["context"], batch["pooled"]):
    np.testing.assert_array_equal(c, rows["context"][int(p)])
  halves = [src.batch(4, 8, i, 2) for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([h["pooled"] for h in halves]), batch["pooled"])
  np.testing.assert_array_equal(src.batch(4, 8)["pooled"], batch["pooled"])
  assert not np.array_equal(src.batch(5, 8)["pooled"], batch["pooled"])
  # Consecutive steps walk through an epoch: 10 rows, batch 5 -> each row once in steps 0-1.
  epoch = np.concatenate([src.batch(s, 5)["pooled"] for s in (0, 1)])
  assert sorted(epoch) == list(range(10))
  with pytest.raises(ValueError, match="one length"):
    arrays.RowSource({"a": np.zeros(3), "b": np.zeros(4)}, seed=0)


# --- tfds -------------------------------------------------------------------------------


def _cifar_config(data_dir, **kw):
  fields = dict(name="tfds", tfds_name="cifar10", split="train", data_dir=data_dir,
                manual_dir=None, random_flip=True, image_key="image", label_key="label")
  fields.update(kw)
  return ConfigDict(fields)


def test_tfds_cifar10_mocked(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=40):
    src = data.build(_cifar_config(str(tmp_path)), seed=0)
  plain = arrays.ArraySource(src.images, 0, max_value=255.0, random_flip=False)
  assert src.shape == (32, 32, 3) and len(src) == 40
  assert src.images.dtype == np.uint8 and src.labels.shape == (40,)
  x = src.batch(3, 16)
  assert x.shape == (16, 32, 32, 3) and x.dtype == np.float32
  assert -1.0 <= x.min() and x.max() <= 1.0 and x.min() < -0.9 and x.max() > 0.9
  np.testing.assert_array_equal(x, src.batch(3, 16))
  halves = [src.batch(3, 16, p, 2) for p in range(2)]
  np.testing.assert_array_equal(np.concatenate(halves), x)
  # Each row is the unflipped row or its mirror, chosen by (seed, step, row).
  flips = []
  for step in range(4):
    a, b = src.batch(step, 16), plain.batch(step, 16)
    mirrored = np.all(a == b[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(mirrored | np.all(a == b, axis=(1, 2, 3)))
    flips.append(mirrored)
  assert 0 < np.sum(flips) < np.size(flips)


def test_tfds_not_prepared_error_is_clear(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  from fgm_jax.data import tfds_images
  empty = tmp_path / "empty_tfds"
  empty.mkdir()
  with pytest.raises(tfds_images.DatasetNotFoundError) as info:
    data.build(_cifar_config(str(empty)), seed=0)
  msg = str(info.value)
  assert isinstance(info.value, FileNotFoundError)
  assert "cifar10" in msg and str(empty) in msg
  assert "download_and_prepare()" in msg and "--config.data.data_dir" in msg
  assert "manual_dir" in msg
  assert not any(empty.iterdir())  # nothing was downloaded or written


def test_tfds_manual_dir_without_archives_refuses_to_download(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  from fgm_jax.data import tfds_images
  manual = tmp_path / "manual"
  manual.mkdir()
  with pytest.raises(tfds_images.DatasetNotFoundError, match="cifar-10-binary.tar.gz"):
    data.build(_cifar_config(str(tmp_path / "data"), manual_dir=str(manual)), seed=0)
