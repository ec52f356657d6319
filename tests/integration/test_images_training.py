"""Image training end to end on CPU: CIFAR-10 configs on mocked tfds data, and the U-Net
under sharding (1 device vs a 4 x 2 mesh) and checkpoint resume.

Models are tiny so compiling them stays in seconds; 8 fake devices (tests/conftest.py) mean
batch sizes are multiples of 8.
"""

import os
import shutil

import jax
import numpy as np
import pytest

from fgm_jax import checkpoint
from fgm_jax import config_checks
from fgm_jax import sharding as sharding_lib
from fgm_jax.models import unet
from fgm_jax.train import trainers
from fgm_jax.train import loop
from fgm_jax.train import run_dir
from configs import cifar10_fgm
from configs import cifar10_teacher
from configs import digits_teacher
from tests import helpers

def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _assert_trees_close(a, b, rtol, atol):
  la, lb = _leaves(a), _leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


# --- (c) CIFAR-10 configs on mocked tfds data -------------------------------------------------


def test_cifar10_runlocal_teacher_on_mock_data(tmp_path):
  # Distilling a CIFAR-10 teacher (cifar10_fgm.py) is covered end to end, with FID, by
  # tests/parity/test_cifar10_rf_fid.py; this is the teacher's tfds path.
  tfds = pytest.importorskip("tensorflow_datasets")
  teacher = cifar10_teacher.get_config("runlocal")
  config_checks.validate(teacher)
  teacher_dir = str(tmp_path / "teacher")
  # The data source is built lazily at the first step, so the whole run stays in the mock.
  with tfds.testing.mock_data(num_examples=32):
    _, t_state = loop.train(teacher, teacher_dir, write_metrics=False, progress=False)
  assert int(t_state.step) == teacher.num_steps
  assert checkpoint.latest_step(checkpoint.checkpoint_dir(teacher_dir)) == teacher.num_steps
  moved = [np.max(np.abs(a - b)) for a, b in zip(_leaves(t_state.params),
                                                 _leaves(t_state.ema_params))]
  assert all(np.isfinite(moved)) and max(moved) > 0  # trained, and the EMA lags behind


def test_cifar10_configs_are_the_documented_ones():
  t, f = cifar10_teacher.get_config(), cifar10_fgm.get_config()
  assert t.model.augment_dim == 0 and t.model.channel_mult == (2, 2, 2)
  assert t.data.tfds_name == "cifar10" and t.data.random_flip and t.data.shape == (32, 32, 3)
  assert f.batch_size == 256
  for opt in (f.optim, f.online_optim):
    assert (opt.lr, opt.b1, opt.b2) == (1e-5, 0.0, 0.999)
  assert f.optim.ema_decay > 0
  for variant in ("", "runlocal"):
    config_checks.validate(cifar10_teacher.get_config(variant))


# --- (d) U-Net: sharding and exact resume -----------------------------------------------------

STEPS, STOP_AT = 6, 3


@pytest.fixture(scope="module", autouse=True)
def _compile_once(tmp_path_factory):
  """A persistent compilation cache for this module's runs.

  Each TeacherTrainer (and each loop.train, which builds one) jits fresh functions, so the same
  U-Net program would be compiled again for every run; on a loaded 2-core CPU that is most of
  this module's time. With the cache, identical programs compile once.
  """
  with helpers.compilation_cache(helpers.worker_cache_dir(tmp_path_factory)):
    yield


def _unet_teacher_config():
  """digits_teacher with an 8-channel one-level U-Net (attention at 8x8, dropout on): the
  sharding and resume under test do not depend on depth, and one level compiles ~3x faster."""
  c = digits_teacher.get_config()
  c.model = unet.tiny(model_channels=8, dropout=0.1, channel_mult=(1,), attn_resolutions=(8,))
  c.batch_size = 16
  c.num_steps = STEPS
  c.checkpoint.every = STOP_AT
  c.checkpoint.keep = 10
  c.log.every = STEPS
  c.optim.warmup_steps = 2
  return c


def _meshes():
  return {"single": sharding_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1]),
          "4x2": sharding_lib.make_mesh(4, 2, 1)}


def _teacher_steps(mesh, init_state=None):
  trainer = trainers.TeacherTrainer(_unet_teacher_config(), mesh)
  # Placing a given initial state saves compiling the (slow) U-Net initialiser once more.
  state = trainer.init_state() if init_state is None else jax.device_put(init_state, trainer.shardings)
  losses = []
  for step in range(STEPS):
    state, metrics = trainer.train_step(state, step)
    losses.append(float(metrics["loss"]))
  assert trainer.traces["train_step"] == 1, trainer.traces  # no retrace between steps
  return losses, state


@pytest.fixture(scope="module")
def unet_runs(tmp_path_factory):
  """Step-by-step runs on 1 device and on 4 x 2; loop.train runs on 4 x 2: uninterrupted, and
  stopped after the step-3 checkpoint then resumed.

  The stop is simulated in-process: a copy of the uninterrupted run's workdir without the
  checkpoints after step 3 is exactly what a run killed just after saving step 3 leaves
  behind. Resuming it in this process reuses the compiled step; two more subprocesses would
  each compile the U-Net again (the SIGKILL-through-the-CLI path itself is covered for the toy
  model in test_resume.py, and the loop is the same).
  """
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
  meshes = _meshes()
  out = {"4x2": _teacher_steps(meshes["4x2"])}
  init = trainers.TeacherTrainer(_unet_teacher_config(), meshes["4x2"]).init_state()  # cached compile
  out["single"] = _teacher_steps(meshes["single"], jax.device_get(init))
  root = tmp_path_factory.mktemp("unet_resume")
  config, mesh = _unet_teacher_config(), meshes["4x2"]
  full, stopped = str(root / "full"), str(root / "stopped")
  _, out["full"] = loop.train(config, full, mesh=mesh, write_metrics=False, progress=False)
  shutil.copytree(full, stopped)
  ckpt_dir = checkpoint.checkpoint_dir(stopped)
  for name in os.listdir(ckpt_dir):
    if name.isdigit() and int(name) > STOP_AT:
      shutil.rmtree(os.path.join(ckpt_dir, name))
  out["stopped_at"] = checkpoint.latest_step(ckpt_dir)
  _, out["resumed"] = loop.train(config, stopped, mesh=mesh, write_metrics=False,
                                 progress=False)
  _, out["restored"] = run_dir.restore_latest(config, full, mesh=mesh)
  return out


def test_unet_teacher_matches_across_meshes(unet_runs):
  (l1, s1), (l8, s8) = unet_runs["single"], unet_runs["4x2"]
  np.testing.assert_allclose(l1, l8, rtol=1e-4)
  assert l1[-1] != l1[0]
  for tree in ("params", "ema_params"):
    _assert_trees_close(getattr(s1, tree), getattr(s8, tree), rtol=1e-4, atol=1e-5)


def test_unet_params_are_split_over_fsdp(unet_runs):
  _, state = unet_runs["4x2"]
  # A 3x3 conv kernel (3, 3, 8, 8) is split over fsdp on a channel axis; Adam's moments and
  # the EMA copy follow it.
  kernel = state.params["enc_8x8_block0"]["conv0"]["kernel"]
  assert "fsdp" in tuple(kernel.sharding.spec)
  assert {s.data.shape for s in kernel.addressable_shards} in ({(3, 3, 4, 8)}, {(3, 3, 8, 4)})
  moments = [x for x in jax.tree.leaves(state.opt_state)
             if getattr(x, "shape", None) == kernel.shape]
  assert len(moments) >= 2
  assert all(m.sharding.spec == kernel.sharding.spec for m in moments)
  ema = state.ema_params["enc_8x8_block0"]["conv0"]["kernel"]
  assert ema.sharding.spec == kernel.sharding.spec


def test_unet_loop_matches_step_by_step_run(unet_runs):
  # loop.train (checkpointing, data positions) computes what the bare steps compute.
  _, stepped = unet_runs["4x2"]
  _assert_trees_close(unet_runs["full"], stepped, rtol=0, atol=1e-6)


def test_unet_teacher_resumes_exactly(unet_runs):
  assert unet_runs["stopped_at"] == STOP_AT
  resumed, uninterrupted = unet_runs["resumed"], unet_runs["restored"]
  assert int(resumed.step) == int(uninterrupted.step) == STEPS
  _assert_trees_close(resumed, uninterrupted, rtol=0, atol=1e-6)
