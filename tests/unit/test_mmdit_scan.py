"""Scanned MM-DiT blocks (scan_layers=True, the default) against the unrolled ones.

Same weights (an unrolled tree and its ``stack_blocks``) must give the same outputs and the
same gradients; the layout functions must round-trip exactly; stacked params must carry the
'layers' logical axis and shard like the blocks they stack.
"""

import functools
import os

# Must precede the first jax import of the process (conftest.py does the same); if jax was
# already initialised with fewer devices the sharding test skips.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import linen as nn  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as P  # noqa: E402

from configs import common as configs  # noqa: E402
from fgm_jax import models  # noqa: E402
from fgm_jax import sharding as sharding_lib  # noqa: E402
from fgm_jax.convert import common, mmdit_keys  # noqa: E402
from fgm_jax.models import mmdit  # noqa: E402
from tests.parity.reference.mmdit_reference import random_inputs, random_params  # noqa: E402

# Three blocks, one scan: the last (context_pre_only) block runs in it as a padded full block.
PLAIN = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
             num_attention_heads=2, joint_attention_dim=10, caption_projection_dim=16,
             pooled_projection_dim=6, out_channels=4, pos_embed_max_size=6,
             dual_attention_layers=(), qk_norm=None)
# SD3.5-like: a dual-attention prefix (0-1, one scan), then plain block 2 and the last block
# (one scan).
DUAL = dict(PLAIN, num_layers=4, dual_attention_layers=(0, 1), qk_norm="rms_norm")
CONFIGS = {"plain": PLAIN, "dual_rms": DUAL}
RTOL = 1e-5


def modules(config, **kw):
  return (mmdit.from_diffusers_config(config, scan_layers=False, **kw),
          mmdit.from_diffusers_config(config, **kw))


def unrolled_params(module, seed=0):
  abstract = mmdit.abstract_variables(module, height=4, width=4, text_len=2)
  return random_params(nn.unbox(abstract)["params"], seed)


def assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def rel_err(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# ----------------------------------------------------------------------------- grouping


def test_block_groups():
  assert mmdit.block_groups(24) == [(0, 24, False, True)]  # SD3-Medium: one run
  sd35 = mmdit.block_groups(24, tuple(range(13)))  # SD3.5-Medium's dual prefix
  assert sd35 == [(0, 13, True, False), (13, 24, False, True)]
  assert mmdit.block_groups(1) == [(0, 1, False, True)]  # alone: a real context_pre_only
  assert mmdit.block_groups(2, (0,)) == [(0, 1, True, False), (1, 2, False, True)]
  # Not a prefix: runs break wherever the attention changes; a dual last block after a plain
  # one stays alone.
  assert mmdit.block_groups(5, (0, 2, 4)) == [
      (0, 1, True, False), (1, 2, False, False), (2, 3, True, False), (3, 4, False, False),
      (4, 5, True, True)]


def test_sd3_medium_params_layout():
  module = mmdit.from_diffusers_config(dict(mmdit.SD3_MEDIUM, num_attention_heads=2,
                                            attention_head_dim=4, caption_projection_dim=8,
                                            joint_attention_dim=4, pooled_projection_dim=4,
                                            pos_embed_max_size=4))
  params = nn.unbox(mmdit.abstract_variables(module, height=4, width=4, text_len=1))["params"]
  blocks = sorted(k for k in params if k.startswith("transformer_blocks_"))
  assert blocks == ["transformer_blocks_0_to_23"]
  run = params["transformer_blocks_0_to_23"]
  assert run["ff"]["fc1"]["kernel"].shape == (24, 8, 32)
  assert run["norm1_context"]["linear"]["kernel"].shape == (24, 8, 48)
  # The padding the last block gets: its context MLP and output projection, and 4 of its 6
  # context adaLN chunks (d = 8).
  d = 8
  padding = (d * 4 * d + 4 * d + 4 * d * d + d) + (d * d + d) + 4 * (d * d + d)
  unrolled = mmdit.param_count(module.clone(scan_layers=False))
  assert mmdit.param_count(module) == unrolled + padding


def test_config_switch():
  build = lambda **kw: models.build(ml_collections.ConfigDict(configs.mmdit(**PLAIN, **kw)))
  assert build().scan_layers and not build(scan_layers=False).scan_layers
  with pytest.raises(ValueError, match="scan_layers"):  # listed among the known fields
    build(scan_layer=False)
  assert "scan_layers" not in mmdit.diffusers_config(build())  # a layout, not diffusers'


# ----------------------------------------------------------------------------- layouts


def test_stack_unstack_round_trip():
  unrolled_module, module = modules(DUAL)
  params = unrolled_params(unrolled_module)
  stacked = mmdit.stack_blocks(params, module)
  want = nn.unbox(mmdit.abstract_variables(module, height=4, width=4, text_len=2))["params"]
  assert jax.tree.structure(stacked) == jax.tree.structure(want)
  assert jax.tree.map(np.shape, stacked) == jax.tree.map(lambda a: a.shape, want)
  q = lambda tree, name: tree[name]["attn2"]["to_q"]["kernel"]
  np.testing.assert_array_equal(q(stacked, "transformer_blocks_0_to_1")[1],
                                q(params, "transformer_blocks_1"))
  for tree in (params, jax.tree.map(jnp.asarray, params)):  # numpy and jax leaves
    assert_same(mmdit.unstack_blocks(mmdit.stack_blocks(tree, module), module), tree)
  # Either layout goes to either module's own; for the unrolled module stacking is the
  # identity, and unstacking an unrolled tree too.
  assert_same(mmdit.stack_blocks(params, unrolled_module), params)
  assert_same(mmdit.unstack_blocks(params, module), params)
  assert_same(mmdit.to_layout(stacked, module), stacked)
  assert_same(mmdit.to_layout(params, module), stacked)
  assert_same(mmdit.to_layout(stacked, unrolled_module), params)


def test_converter_layouts():
  unrolled_module, module = modules(DUAL)
  params = unrolled_params(unrolled_module)
  state = mmdit_keys.state_from_params(params, DUAL)
  assert "transformer_blocks.1.attn2.to_q.weight" in state
  stacked = mmdit.stack_blocks(params, module)
  # Saving either layout writes the same file; loading gives the module's layout.
  again = mmdit_keys.state_from_params(stacked, DUAL)
  assert sorted(again) == sorted(state)
  for k, v in state.items():
    np.testing.assert_array_equal(again[k], v, err_msg=k)
  assert_same(mmdit_keys.params_from_state(state, DUAL), stacked)
  assert_same(mmdit_keys.params_from_state(state, dict(DUAL, scan_layers=False)), params)


# ----------------------------------------------------------------------------- numerics


def outputs_and_grads(module, params, x, t, cond, w):
  """(v, d<v, w>/d(params, x, cond)) in one compiled function."""
  def loss(p, x, cond):
    v = module.apply({"params": p}, x, t, cond)
    return jnp.sum(v * w), v
  (_, v), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
      params, x, cond)
  return v, grads


@functools.lru_cache(maxsize=None)
def unrolled_reference(name):
  """(params, inputs, cotangent, outputs and grads) of the unrolled module, once per config
  (remat changes no value, so the plain run is every remat's reference too)."""
  config = CONFIGS[name]
  module = mmdit.from_diffusers_config(config, scan_layers=False)
  params = unrolled_params(module)
  x, t, cond = random_inputs(config, batch=2, height=8, width=6, text_len=5)
  w = np.random.default_rng(1).standard_normal(x.shape[:3] + (4,)).astype(np.float32)
  return params, (x, t, cond, w), outputs_and_grads(module, params, x, t, cond, w)


@pytest.mark.parametrize("name,remat", [("plain", "none"), ("dual_rms", "none"),
                                        ("plain", "dots")])
def test_scanned_equals_unrolled(name, remat):
  params, inputs, (v_ref, (gp_ref, gx_ref, gc_ref)) = unrolled_reference(name)
  module = mmdit.from_diffusers_config(CONFIGS[name], remat=remat)
  v, (gp, gx, gc) = outputs_and_grads(module, mmdit.stack_blocks(params, module), *inputs)
  assert rel_err(v, v_ref) <= RTOL, name
  # The padded last block's context-only weights get exactly zero gradients (so they stay
  # zero in training): its context output is dropped.
  last = gp[mmdit.group_name(*mmdit.block_groups(CONFIGS[name]["num_layers"],
                                                 CONFIGS[name]["dual_attention_layers"])[-1][:2])]
  d = CONFIGS[name]["caption_projection_dim"]
  for g in (jax.tree.leaves(last["ff_context"]) + jax.tree.leaves(last["attn"]["to_add_out"])
            + [last["norm1_context"]["linear"]["kernel"][..., 2 * d:]]):
    assert not np.any(np.asarray(g)[-1]), name
  gp = mmdit.unstack_blocks(gp, module)
  assert jax.tree.structure(gp) == jax.tree.structure(gp_ref)
  for path, g in common.flatten(gp_ref).items():
    assert rel_err(common.flatten(gp)[path], g) <= RTOL, (name, path)
  assert rel_err(gx, gx_ref) <= RTOL, name
  for k in gc_ref:
    assert rel_err(gc[k], gc_ref[k]) <= RTOL, (name, k)


def test_remat_is_inside_the_scan():
  _, module = modules(PLAIN, remat="dots")
  params = mmdit.stack_blocks(unrolled_params(modules(PLAIN)[0]), module)
  x, t, cond = random_inputs(PLAIN, batch=1, height=4, width=4, text_len=2)
  loss = lambda p: jnp.sum(module.apply({"params": p}, x, t, cond) ** 2)
  jaxpr = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
  scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
  assert scans, "the run of blocks is not a scan"
  bodies = " ".join(str(e.params["jaxpr"]) for e in scans)
  assert "remat" in bodies or "checkpoint" in bodies


# ----------------------------------------------------------------------------- sharding


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS, see top)")
@pytest.mark.parametrize("rules,shape", [
    (mmdit.LOGICAL_RULES, (2, 4, 1)),
    (mmdit.TENSOR_LOGICAL_RULES, (2, 2, 2)),
])
def test_stacked_params_shard_like_their_blocks(rules, shape):
  assert ("layers", None) in rules
  # 4 heads of 8: widths divisible by fsdp=4 and tensor=2.
  unrolled_module, module = modules(dict(DUAL, num_attention_heads=4, caption_projection_dim=32))
  boxed = mmdit.abstract_variables(module, height=4, width=4, text_len=2)["params"]
  boxed_ref = mmdit.abstract_variables(unrolled_module, height=4, width=4, text_len=2)["params"]
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(shape), sharding_lib.MESH_AXES)
  shardings = sharding_lib.tree_shardings(boxed, mesh, rules)
  shardings_ref = sharding_lib.tree_shardings(boxed_ref, mesh, rules)
  is_box = lambda b: isinstance(b, nn.LogicallyPartitioned)
  run = "transformer_blocks_0_to_1"
  names = common.flatten(jax.tree.map(lambda b: b.names, boxed[run], is_leaf=is_box))
  specs = common.flatten(jax.tree.map(lambda s: s.spec, shardings[run]))
  assert len(names) > 20
  for i in (0, 1):
    block = f"transformer_blocks_{i}"
    names_ref = common.flatten(jax.tree.map(lambda b: b.names, boxed_ref[block],
                                            is_leaf=is_box))
    specs_ref = common.flatten(jax.tree.map(lambda s: s.spec, shardings_ref[block]))
    for path in names_ref:
      assert names[path] == ("layers",) + tuple(names_ref[path]), path
      assert tuple(specs[path]) == (None,) + tuple(specs_ref[path]), path
  # Placed: each device holds both layers of its slice of the block's weights.
  kernel = jax.device_put(np.zeros((2, 32, 128), np.float32),
                          shardings[run]["ff"]["fc1"]["kernel"])
  tensor = shape[2]
  assert {s.data.shape for s in kernel.addressable_shards} == {(2, 32 // shape[1],
                                                                128 // tensor)}
