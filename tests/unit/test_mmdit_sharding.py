"""MM-DiT params shard over a fake 8-device CPU mesh and the sharded forward is unchanged."""

import os

# Must precede the first jax import of the process (conftest.py does the same); if jax was
# already initialised with fewer devices the tests below skip.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import linen as nn  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from fgm_jax.convert import common  # noqa: E402
from fgm_jax.models import mmdit  # noqa: E402
from tests.parity.reference.mmdit_reference import random_params  # noqa: E402

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs 8 devices: run this file in its own process so XLA_FLAGS="
           "--xla_force_host_platform_device_count=8 takes effect before jax starts")

# Widths divisible by fsdp=4 and tensor=2 so every split is even. Blocks 0-1 (dual
# attention) run as one scan with params stacked on a leading 'layers' axis; block 2 is the
# last, context_pre_only block.
CONFIG = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
              num_attention_heads=4, joint_attention_dim=12, caption_projection_dim=32,
              pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8,
              dual_attention_layers=(0, 1), qk_norm="rms_norm")
RUN = "transformer_blocks_0_to_1"  # the scanned run: leaves are (2, ...)
BATCH = 8  # split over data x fsdp


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((BATCH, 8, 8, 4)).astype(np.float32)
  t = rng.uniform(size=BATCH).astype(np.float32)
  cond = {"context": rng.standard_normal((BATCH, 5, 12)).astype(np.float32),
          "pooled": rng.standard_normal((BATCH, 8)).astype(np.float32)}
  return x, t, cond


@pytest.fixture(scope="module")
def setup():
  module = mmdit.from_diffusers_config(CONFIG)
  abstract = mmdit.abstract_variables(module, batch=BATCH, height=8, width=8, text_len=5)
  params = random_params(nn.unbox(abstract)["params"])
  x, t, cond = inputs()
  with jax.default_device(jax.devices()[0]):
    reference = np.asarray(jax.jit(module.apply)({"params": params}, x, t, cond))
  return module, abstract, params, (x, t, cond), reference


def shard_and_run(setup, mesh, rules):
  module, abstract, params, (x, t, cond), _ = setup
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
  sharded = jax.device_put(params, shardings["params"])
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  x, t, cond = jax.device_put((x, t, cond), batch)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    out = jax.jit(module.apply)({"params": sharded}, x, t, cond)
  return sharded, out


def loss_grad(module, params, x, t, cond, out_shardings=None):
  loss = lambda p: jnp.mean(jnp.square(module.apply({"params": p}, x, t, cond)))
  return jax.jit(jax.grad(loss), out_shardings=out_shardings)(params)


def assert_split(array, spec, shard_shape):
  assert array.sharding.spec == spec, (array.sharding.spec, spec)
  assert {s.data.shape for s in array.addressable_shards} == {shard_shape}


def test_fsdp_mesh(setup):
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
  sharded, out = shard_and_run(setup, mesh, mmdit.LOGICAL_RULES)
  block = sharded[RUN]  # stacked: the 'layers' axis is replicated, the rest as one block's
  d = 32
  assert_split(block["ff"]["fc1"]["kernel"], P(None, "fsdp", None), (2, d // 4, 4 * d))
  assert_split(block["ff"]["fc2"]["kernel"], P(None, None, "fsdp"), (2, 4 * d, d // 4))
  assert_split(block["attn"]["to_q"]["kernel"], P(None, "fsdp", None), (2, d // 4, d))
  assert_split(block["attn2"]["to_out"]["kernel"], P(None, None, "fsdp"), (2, d, d // 4))
  assert_split(block["norm1"]["linear"]["kernel"], P(None, "fsdp", None), (2, d // 4, 9 * d))
  assert_split(sharded["transformer_blocks_2"]["ff"]["fc1"]["kernel"], P("fsdp", None),
               (d // 4, 4 * d))
  assert_split(sharded["context_embedder"]["kernel"], P(None, "fsdp"), (12, d // 4))
  assert_split(sharded["pos_embed"], P(None, None, "fsdp"), (1, 64, d // 4))
  assert_split(sharded["timestep_embedder_linear_2"]["kernel"], P(None, "fsdp"),
               (d, d // 4))
  np.testing.assert_allclose(np.asarray(out), setup[-1], rtol=1e-5, atol=1e-5)
  assert out.sharding.spec[0] == ("data", "fsdp")


def test_fsdp_gradients_match(setup):
  # Training differentiates through the sharded model: gradients must not change either,
  # and come back sharded like the params (what an FSDP optimizer update needs).
  module, abstract, params, (x, t, cond), _ = setup
  with jax.default_device(jax.devices()[0]):
    want = loss_grad(module, params, x, t, cond)
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
  rules = mmdit.LOGICAL_RULES
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
  sharded = jax.device_put(params, shardings["params"])
  batch = jax.device_put((x, t, cond), NamedSharding(mesh, P(("data", "fsdp"))))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    got = loss_grad(module, sharded, *batch, out_shardings=shardings["params"])
  for path, g in common.flatten(got).items():
    np.testing.assert_allclose(np.asarray(g), np.asarray(common.flatten(want)[path]),
                               rtol=1e-4, atol=1e-6, err_msg=str(path))
  kernel = got[RUN]["ff"]["fc1"]["kernel"]
  assert kernel.sharding.spec == P(None, "fsdp", None)


def test_fsdp_tensor_mesh(setup):
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
  sharded, out = shard_and_run(setup, mesh, mmdit.TENSOR_LOGICAL_RULES)
  block = sharded["transformer_blocks_2"]
  d = 32
  assert_split(block["ff"]["fc1"]["kernel"], P("fsdp", "tensor"), (d // 2, 2 * d))
  assert_split(block["attn"]["to_k"]["kernel"], P("fsdp", "tensor"), (d // 2, d // 2))
  assert_split(block["attn"]["to_out"]["kernel"], P("tensor", "fsdp"), (d // 2, d // 2))
  assert_split(block["norm1"]["linear"]["kernel"], P("fsdp", None), (d // 2, 6 * d))
  assert_split(sharded[RUN]["attn2"]["to_q"]["kernel"], P(None, "fsdp", "tensor"),
               (2, d // 2, d // 2))
  np.testing.assert_allclose(np.asarray(out), setup[-1], rtol=1e-5, atol=1e-5)


def test_rules_only_name_known_axes():
  names = {"data", "fsdp", "tensor"}
  for rules in (mmdit.LOGICAL_RULES, mmdit.TENSOR_LOGICAL_RULES):
    for _, axis in rules:
      axes = axis if isinstance(axis, tuple) else (axis,)
      assert set(a for a in axes if a) <= names
  assert all(axis != "tensor" for _, axis in mmdit.LOGICAL_RULES)
