"""The trainer shards MM-DiT by the model's own logical rules when the config names none.

An MM-DiT distill state built from a config with ``mesh.rules = ()`` and fsdp=4 (8 fake CPU
devices) must have its large kernels split over 'fsdp', and FGM iterations on that mesh must
compute what they compute on one device. Conditioning travels as step-keyed data (RowSource),
as prompt embeddings will.
"""

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import common
from fgm_jax import sharding as sharding_lib
from fgm_jax.data import arrays
from fgm_jax.models import mmdit
from fgm_jax.train import trainers
from tests.parity.reference.mmdit_reference import random_params

pytestmark = pytest.mark.skipif(jax.device_count() < 8,
                                reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")

# Widths divisible by fsdp=4; three blocks: 0-1 one scan (params stacked on a leading
# 'layers' axis), 2 the context_pre_only last block.
MMDIT = common.mmdit(sample_size=8, patch_size=2, in_channels=4, num_layers=3,
                     attention_head_dim=8, num_attention_heads=4, joint_attention_dim=12,
                     caption_projection_dim=32, pooled_projection_dim=8, out_channels=4,
                     pos_embed_max_size=8, dual_attention_layers=(), qk_norm="rms_norm")
WIDTH = 32
TEXT_LEN, PROMPTS, STEPS = 5, 24, 2


def distill_config(fsdp):
  teacher = common.base("train", "teacher")
  teacher.model = ml_collections.ConfigDict(MMDIT)
  # Only the example shape is read: the distill step draws no data, only conditioning rows.
  teacher.data = dict(name="tfds", tfds_name="unused", shape=(8, 8, 4))
  teacher.optim = common.optim(lr=1e-4)
  teacher.flow = common.times()
  teacher.workdir = "unused"
  teacher.use_ema = True
  c = common.base("train", "fgm")
  c.teacher = teacher
  c.mesh = common.mesh(fsdp=fsdp)  # no rules: the trainer must take MM-DiT's own
  c.batch_size = 8
  c.num_steps = STEPS
  c.fgm = common.fgm()
  c.optim = common.optim(lr=1e-3, b1=0.0, ema_decay=0.9)
  c.online_optim = common.optim(lr=1e-3, b1=0.0)
  return c


def prompt_embeddings():
  rng = np.random.default_rng(1)
  return {"context": rng.standard_normal((PROMPTS, TEXT_LEN, 12)).astype(np.float32),
          "pooled": rng.standard_normal((PROMPTS, 8)).astype(np.float32)}


def run(mesh, fsdp, teacher_params):
  config = distill_config(fsdp)
  assert tuple(config.mesh.rules) == ()
  trainer = trainers.FGMTrainer(config, mesh, teacher_params=teacher_params,
                                    cond_source=arrays.RowSource(prompt_embeddings(), seed=3))
  state = trainer.init_state()
  losses = []
  for step in range(STEPS):
    state, metrics = trainer.train_step(state, step)
    losses.append({k: float(v) for k, v in metrics.items()})
  trainer.close()
  return trainer, state, losses


@pytest.fixture(scope="module")
def runs():
  layout = trainers.FGMTrainer(distill_config(1), sharding_lib.make_mesh(1, 1, 1,
                                                                        jax.devices()[:1]))
  teacher = random_params(layout.abstract_state.gen_params)
  return {"fsdp4": run(sharding_lib.make_mesh(-1, 4, 1), 4, teacher),
          "single": run(sharding_lib.make_mesh(1, 1, 1, jax.devices()[:1]), 1, teacher),
          "teacher": teacher}


def _split(array, spec, shard_shape):
  assert array.sharding.spec == spec, (array.sharding.spec, spec)
  assert {s.data.shape for s in array.addressable_shards} == {shard_shape}


def test_default_rules_are_the_models(runs):
  trainer, _, _ = runs["fsdp4"]
  assert trainer.sharding.rules == tuple(tuple(r) for r in mmdit.LOGICAL_RULES)


def test_large_kernels_are_split_over_fsdp(runs):
  _, state, _ = runs["fsdp4"]
  d = WIDTH
  for tree in (state.gen_params, state.online_params, state.gen_ema_params):
    block = tree["transformer_blocks_0_to_2"]  # all three blocks, the last one padded
    _split(block["ff"]["fc1"]["kernel"], P(None, "fsdp", None), (3, d // 4, 4 * d))
    _split(block["ff"]["fc2"]["kernel"], P(None, None, "fsdp"), (3, 4 * d, d // 4))
    _split(block["attn"]["to_q"]["kernel"], P(None, "fsdp", None), (3, d // 4, d))
    _split(block["norm1"]["linear"]["kernel"], P(None, "fsdp", None), (3, d // 4, 6 * d))
  # Adam's moments follow their parameter.
  fc1 = state.gen_params["transformer_blocks_0_to_2"]["ff"]["fc1"]["kernel"]
  moments = [x for x in jax.tree.leaves(state.gen_opt_state) if x.shape == fc1.shape]
  assert len(moments) >= 2 and all(m.sharding.spec == fc1.sharding.spec for m in moments)


def test_sharded_steps_equal_single_device(runs):
  (_, s4, l4), (_, s1, l1) = runs["fsdp4"], runs["single"]
  for a, b in zip(l4, l1):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=1e-6, err_msg=k)
  # Adam divides by sqrt(second moment): where a gradient is near zero, reduction-order noise
  # moves an update by a fraction of its lr-sized step, so the parameter tolerance is a small
  # fraction of one step (a wrong split would be off by whole steps almost everywhere).
  lr = distill_config(1).optim.lr
  for tree in ("gen_params", "online_params"):
    for x, y in zip(jax.tree.leaves(jax.device_get(getattr(s4, tree))),
                    jax.tree.leaves(jax.device_get(getattr(s1, tree)))):
      np.testing.assert_allclose(x, y, rtol=0, atol=0.05 * lr * STEPS)
      assert np.mean(np.abs(x - y) > 1e-6) < 0.01  # and nearly all entries agree closely
  # The generator moved away from the teacher: equality is not about untouched weights.
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                                       jax.device_get(s1.gen_params), runs["teacher"]))
  assert max(moved) > 1e-4


def test_steps_trace_once(runs):
  for trainer, _, _ in (runs["fsdp4"], runs["single"]):
    assert trainer.traces["train_step"] == 1, trainer.traces
    assert trainer.traces["init"] == 1, trainer.traces
