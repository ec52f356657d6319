"""The same training on one device and on a (4 data x 2 fsdp) mesh of fake CPU devices."""

import jax
import numpy as np
import pytest

from fgm_jax import sharding as sharding_lib
from fgm_jax.train import trainers
from tests import helpers

pytestmark = pytest.mark.skipif(jax.device_count() < 8,
                                reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")


def _meshes():
  return {"single": sharding_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1]),
          "4x2": sharding_lib.make_mesh(4, 2, 1)}


def _run_distill(mesh, iterations=20):
  teacher_config = helpers.tiny_teacher_config()
  teacher = trainers.TeacherTrainer(teacher_config, mesh).init_state()  # same seed -> same values
  config = helpers.tiny_fgm_config("unused")
  trainer = trainers.FGMTrainer(config, mesh, teacher_params=teacher.params)
  state = trainer.init_state()
  losses = []
  for step in range(iterations):
    state, metrics = trainer.train_step(state, step)
    losses.append({k: float(v) for k, v in metrics.items()})
  # Retrace guard: every iteration reuses the one compiled step.
  assert trainer.traces["train_step"] == 1, trainer.traces
  return state, losses


@pytest.fixture(scope="module")
def distill_runs():
  return {name: _run_distill(mesh) for name, mesh in _meshes().items()}


def test_fgm_losses_and_params_match_across_meshes(distill_runs):
  (s1, l1), (s8, l8) = distill_runs["single"], distill_runs["4x2"]
  for a, b in zip(l1, l8):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)
  for tree in ("gen_params", "online_params", "gen_ema_params"):
    flat1 = jax.tree.leaves(jax.device_get(getattr(s1, tree)))
    flat8 = jax.tree.leaves(jax.device_get(getattr(s8, tree)))
    for a, b in zip(flat1, flat8):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # Training moved the generator: equality is not trivially about untouched weights.
  assert l1[-1]["generator_loss"] != l1[0]["generator_loss"]


def test_parameters_are_split_over_fsdp(distill_runs):
  state, _ = distill_runs["4x2"]
  kernel = state.gen_params["Dense_3"]["kernel"]  # (32, 32) hidden layer
  assert "fsdp" in tuple(kernel.sharding.spec)
  shard_shapes = {s.data.shape for s in kernel.addressable_shards}
  assert shard_shapes == {(16, 32)} or shard_shapes == {(32, 16)}
  # Adam moments follow their parameter.
  moments = [x for x in jax.tree.leaves(state.gen_opt_state) if x.shape == kernel.shape]
  assert len(moments) >= 2 * 2  # mu and nu of the (32, 32) kernels
  assert all(m.sharding.spec == kernel.sharding.spec for m in moments)
  # The first layer's (2, 32) kernel is split on its divisible dimension.
  first = state.gen_params["Dense_2"]["kernel"]
  assert {s.data.shape for s in first.addressable_shards} == {(2, 16)}


def test_teacher_steps_match_across_meshes():
  out = {}
  for name, mesh in _meshes().items():
    trainer = trainers.TeacherTrainer(helpers.tiny_teacher_config(), mesh)
    state = trainer.init_state()
    losses = []
    for step in range(10):
      state, m = trainer.train_step(state, step)
      losses.append(float(m["loss"]))
    assert trainer.traces["train_step"] == 1, trainer.traces
    out[name] = (losses, jax.device_get(state.params))
  np.testing.assert_allclose(out["single"][0], out["4x2"][0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(out["single"][1]), jax.tree.leaves(out["4x2"][1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_shape_rule():
  assert sharding_lib.shape_rule_spec((32, 64), 2) == jax.sharding.PartitionSpec(None, "fsdp")
  assert sharding_lib.shape_rule_spec((3,), 2) == jax.sharding.PartitionSpec()
  assert sharding_lib.shape_rule_spec((6, 5), 1) == jax.sharding.PartitionSpec()
