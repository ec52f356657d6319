"""The Flax FID Inception against pytorch-fid's, and the weight converter's error paths.

Reference: pytorch-fid 0.3.0 (PyPI) building its FID ``InceptionV3`` (output block 3,
resize to 299, ``2x - 1``, the FIDInceptionA/C/E_1/E_2 blocks) with random weights in place
of its download (tests/parity/reference/inception_reference.py). Its state dict, saved with ``torch.save``,
goes through the real path: ``python -m fgm_jax.convert.inception`` (in-process) ->
safetensors -> ``inception.load_params`` -> ``inception.pool_features``; features are
compared on random uint8 images at 32x32 (upsampled to 299), 299x299 (no resize) and
320x320 (downsampled: torch's bilinear does not antialias, jax.image.resize would).
Measured on CPU: max |ours - torch| / max |torch| about 1e-6 at every size (limit 1e-4).

About torchvision (which pytorch-fid imports): requirements-test.txt pins torch 2.13.0 CPU,
and the torchvision that fits it (0.28.0, resolved by pip from pytorch-fid's dependency) is
built for PyPI's CUDA torch, so its compiled ops cannot load here and its
``_meta_registrations`` module fails on import ("operator torchvision::nms does not exist").
tests/conftest.py installs tests/torchvision_without_ops.py, which skips only that module when
the ops are missing; the torchvision model classes pytorch-fid subclasses, its transforms
and pytorch-fid itself are the real, installed code. See that file for the details.
"""

import argparse

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytorch_fid", reason="pytorch-fid is in requirements-test.txt")

import safetensors  # noqa: E402
import safetensors.numpy  # noqa: E402

from fgm_jax.convert import common  # noqa: E402
from fgm_jax.convert import inception as convert  # noqa: E402
from fgm_jax.evaluation import inception  # noqa: E402
from tests.parity.reference import inception_reference  # noqa: E402

TOL = 1e-4  # max |ours - torch| / max |torch|, fp32
BATCH = 2
SIZES = {"upsample_32": 32, "identity_299": 299, "downsample_320": 320}

_pool_features = jax.jit(inception.pool_features)


def _rel_err(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _images(size, seed):
  return np.random.default_rng(seed).integers(0, 256, (BATCH, size, size, 3), dtype=np.uint8)


def _one_line(excinfo):
  message = str(excinfo.value)
  assert "\n" not in message, message
  return message


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(pytorch-fid model, its state dict, the .pth, our converted .safetensors, variables)."""
  model, state = inception_reference.build(seed=0)
  folder = tmp_path_factory.mktemp("fid_inception")
  pth, out = str(folder / "random_inception.pth"), str(folder / "fid_inception.safetensors")
  torch.save(state, pth)
  assert convert.main([pth, out]) == 0
  return model, state, pth, out, inception.load_params(out)


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_pool_features_match_pytorch_fid(reference, size):
  model, _, _, _, variables = reference
  images = _images(size, seed=size)
  ours = _pool_features(variables, images)
  ref = inception_reference.pool_features(model, images)
  assert ours.shape == (BATCH, inception.FEATURE_DIM) and ours.dtype == np.float32
  assert np.std(ref) > 0.1 * np.mean(np.abs(ref))  # features that vary: a meaningful check
  err = _rel_err(ours, ref)
  print(f"{size}x{size}: max rel err {err:.2e}")
  assert err < TOL, err


@pytest.mark.parametrize("shape", [(32, 32), (320, 320), (512, 512), (40, 300)])
def test_resize_is_torch_bilinear_without_antialiasing(shape):
  x = np.random.default_rng(1).random((1, *shape, 3), dtype=np.float32)
  ours = np.asarray(inception.resize_bilinear(x, 299, 299))
  ref = inception_reference.resize(x, 299)
  assert np.max(np.abs(ours - ref)) < 1e-6


def test_converter_accounts_for_every_tensor(reference):
  _, state, pth, out, variables = reference
  flat = safetensors.numpy.load_file(out)
  ignored = [k for k in state if k.endswith("num_batches_tracked") or k.startswith("fc.")]
  assert len(flat) + len(ignored) == len(state)  # every torch key mapped or ignored by rule
  kernel = variables["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"]  # a 1x7 conv
  np.testing.assert_array_equal(
      kernel, np.transpose(state["Mixed_6b.branch7x7_2.conv.weight"].numpy(), (2, 3, 1, 0)))
  np.testing.assert_array_equal(variables["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"],
                                state["Mixed_7c.branch_pool.bn.running_var"].numpy())
  with safetensors.safe_open(out, framework="numpy") as f:
    meta = f.metadata()
  assert meta["format"] == inception.FORMAT and meta["official"] == "false"


def test_refuses_pickled_objects(tmp_path, capsys):
  path = str(tmp_path / "training_checkpoint.pth")
  torch.save({"args": argparse.Namespace(lr=1e-3), "step": 3}, path)
  assert convert.main([path, str(tmp_path / "out.safetensors")]) == 1
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "weights_only" in err and path in err, err
  assert not (tmp_path / "out.safetensors").exists()


def test_lists_missing_unexpected_and_misshaped_keys(reference, tmp_path):
  _, state, _, _, _ = reference
  bad = dict(state)
  del bad["Mixed_7c.branch_pool.bn.running_var"]
  bad["Mixed_5b.branch_pool.conv.weight"] = torch.zeros(48, 192, 1, 1)
  bad["Mixed_8a.conv.weight"] = torch.zeros(1)
  path = str(tmp_path / "other.pth")
  torch.save(bad, path)
  with pytest.raises(common.ConversionError) as excinfo:
    convert.convert(path, str(tmp_path / "out.safetensors"))
  message = _one_line(excinfo)
  for expected in ("1 missing", "Mixed_7c.branch_pool.bn.running_var", "1 unexpected",
                   "Mixed_8a.conv.weight", "1 wrong shape", "Mixed_5b.branch_pool.conv.weight",
                   "(32, 192, 1, 1), got (48, 192, 1, 1)"):
    assert expected in message, message


def test_refuses_imagenet_inception(tmp_path):
  path = str(tmp_path / "inception_v3_google.pth")
  torch.save({"fc.weight": torch.zeros(1000, 2048)}, path)
  with pytest.raises(common.ConversionError) as excinfo:
    convert.convert(path, str(tmp_path / "out.safetensors"))
  assert "1008" in _one_line(excinfo)


def test_missing_files_say_where_to_get_the_weights(tmp_path):
  with pytest.raises(inception.InceptionWeightsNotFoundError) as excinfo:
    inception.load_params(str(tmp_path / "fid_inception.safetensors"))
  message = _one_line(excinfo)
  for expected in (inception.FID_WEIGHTS_NAME, "95.6 MB", "fid_weights",
                   "python -m fgm_jax.convert.inception"):
    assert expected in message, message
  with pytest.raises(inception.InceptionWeightsNotFoundError) as excinfo:
    convert.convert(str(tmp_path / inception.FID_WEIGHTS_NAME), str(tmp_path / "o.safetensors"))
  assert "fid_weights" in _one_line(excinfo)


def test_load_params_rejects_other_files(reference, tmp_path):
  _, _, pth, out, _ = reference
  with pytest.raises(common.ConversionError) as excinfo:
    inception.load_params(pth)  # the .pth itself
  assert "convert it first" in _one_line(excinfo)
  flat = safetensors.numpy.load_file(out)
  flat["params/Mixed_6e/branch1x1/conv/kernel"] = np.zeros((1, 1, 768, 7), np.float32)
  del flat["batch_stats/Conv2d_1a_3x3/bn/mean"]
  wrong = str(tmp_path / "wrong.safetensors")
  safetensors.numpy.save_file(flat, wrong)
  with pytest.raises(common.ConversionError) as excinfo:
    inception.load_params(wrong)
  message = _one_line(excinfo)
  assert "params/Mixed_6e/branch1x1/conv/kernel" in message, message
  assert "batch_stats/Conv2d_1a_3x3/bn/mean" in message, message


def test_pool_features_wants_uint8(reference):
  with pytest.raises(TypeError, match="uint8"):
    inception.pool_features(reference[4], np.zeros((1, 32, 32, 3), np.float32))
