"""Low-rank adapters (models/lora.py) on the MM-DiT, against closed forms.

Fresh adapters (B = 0) leave the teacher's output exactly; adapters applied on the
activations equal the merged weights W + s A B; their gradient is the chain rule's
s A^T dL/dW; they carry their kernel's logical axes (and shard like it); the rank and target
checks say which field to change; the LoRA file has diffusers' SD3 key layout (the
diffusers-side load is tests/integration/test_sd3_lora.py).
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import linen as nn  # noqa: E402
from flax import traverse_util  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from configs import common  # noqa: E402
from fgm_jax import config_checks  # noqa: E402
from fgm_jax import sharding as sharding_lib  # noqa: E402
from fgm_jax.convert import common as convert_common  # noqa: E402
from fgm_jax.convert import sd3_lora  # noqa: E402
from fgm_jax.models import lora  # noqa: E402
from fgm_jax.models import mmdit  # noqa: E402
from tests import helpers  # noqa: E402
from tests.unit.test_mmdit_scan import PLAIN, unrolled_params  # noqa: E402
from tests.parity.reference.mmdit_reference import random_inputs  # noqa: E402

TARGETS = ("attention", "mlp", "adaln")


def adapters_config(rank=4, alpha=None, targets=TARGETS):
  return common.lora(rank=rank, alpha=alpha, targets=targets)


def setup(scan, rank=4, alpha=8.0):
  """(module, teacher params, Adapters, fresh adapters, inputs) of the three-block MM-DiT."""
  module = mmdit.from_diffusers_config(PLAIN, scan_layers=scan)
  params = mmdit.stack_blocks(unrolled_params(mmdit.from_diffusers_config(
      PLAIN, scan_layers=False)), module)
  adapters = lora.from_config(adapters_config(rank, alpha), mmdit.LORA_TARGETS)
  fresh = adapters.init(params, jax.random.PRNGKey(1))
  x, t, cond = random_inputs(PLAIN, batch=2, height=4, width=4, text_len=3, seed=2)
  return module, params, adapters, fresh, (x, t, cond)


def apply(module, params, inputs):
  return module.apply({"params": params}, *inputs)


def randomise_b(tree, seed=3):
  flat = traverse_util.flatten_dict(tree)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(flat))
  return traverse_util.unflatten_dict({
      p: (0.1 * jax.random.normal(k, v.shape) if p[-1] == lora.B else v)
      for k, (p, v) in zip(keys, flat.items())})


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_fresh_adapters_give_the_teachers_output_exactly(scan):
  module, params, adapters, fresh, inputs = setup(scan)
  assert all(p[-1] in (lora.A, lora.B) for p in traverse_util.flatten_dict(fresh))
  assert all(np.all(np.asarray(v) == 0) for p, v in traverse_util.flatten_dict(fresh).items()
             if p[-1] == lora.B)
  np.testing.assert_array_equal(apply(module, adapters.compose(fresh, params), inputs),
                                apply(module, params, inputs))


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_adapters_on_the_activations_equal_the_merged_weights(scan):
  module, params, adapters, fresh, inputs = setup(scan)
  trained = randomise_b(fresh)
  got = apply(module, adapters.compose(trained, params), inputs)
  want = apply(module, adapters.merge(trained, params), inputs)
  teacher = apply(module, params, inputs)
  assert float(jnp.max(jnp.abs(got - teacher))) > 1e-2  # the adapters do something
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_adapter_gradient_is_the_chain_rule(scan):
  """dL/dB = s A^T dL/dW and dL/dA = s dL/dW B^T at W_eff = W + s A B (every layer)."""
  module, params, adapters, fresh, inputs = setup(scan)
  trained = randomise_b(fresh)
  probe = jax.random.normal(jax.random.PRNGKey(4), inputs[0].shape)
  loss = lambda p: jnp.sum(apply(module, p, inputs) * probe)
  grad_ad = jax.jit(jax.grad(lambda ad: loss(adapters.compose(ad, params))))(trained)
  grad_w = jax.jit(jax.grad(loss))(adapters.merge(trained, params))
  flat_ad, flat_w = traverse_util.flatten_dict(grad_ad), traverse_util.flatten_dict(grad_w)
  flat = traverse_util.flatten_dict(trained)
  s = adapters.scale
  assert s == 2.0
  for module_path in {p[:-1] for p in flat}:
    a, b = flat[module_path + (lora.A,)], flat[module_path + (lora.B,)]
    g = flat_w[module_path + ("kernel",)]
    np.testing.assert_allclose(flat_ad[module_path + (lora.B,)],
                               s * jnp.einsum("...ir,...io->...ro", a, g), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(flat_ad[module_path + (lora.A,)],
                               s * jnp.einsum("...io,...ro->...ir", g, b), rtol=1e-5, atol=1e-5)


def test_adapters_carry_their_kernels_axes_and_shard_like_them():
  module = mmdit.from_diffusers_config(PLAIN)
  boxed = mmdit.abstract_variables(module, height=4, width=4, text_len=2)["params"]
  adapters = lora.from_config(adapters_config(), mmdit.LORA_TARGETS)
  shapes = jax.eval_shape(lambda: adapters.init(boxed, jax.random.PRNGKey(0)))
  run = "transformer_blocks_0_to_2"
  kernel = boxed[run]["attn"]["to_q"]["kernel"]
  a, b = shapes[run]["attn"]["to_q"][lora.A], shapes[run]["attn"]["to_q"][lora.B]
  assert kernel.names == ("layers", "embed", "heads")
  assert a.names == ("layers", "embed", "lora") and a.value.shape == (3, 16, 4)
  assert b.names == ("layers", "lora", "heads") and b.value.shape == (3, 4, 16)
  out = shapes[run]["attn"]["to_out"]
  assert out[lora.A].names == ("layers", "heads", "lora")
  assert out[lora.B].names == ("layers", "lora", "embed")
  mesh = sharding_lib.make_mesh(data=1, fsdp=8)
  for rules, b_spec in ((mmdit.LOGICAL_RULES, P(None, None, None)),
                        (mmdit.TENSOR_LOGICAL_RULES, P(None, None, "tensor"))):
    sh = sharding_lib.tree_shardings(shapes, mesh, rules)[run]["attn"]["to_q"]
    assert sh[lora.A].spec == P(None, "fsdp", None)  # the kernel's 'embed' side
    assert sh[lora.B].spec == b_spec
  # Only the adapted projections: no embedders, output layer or positional table.
  assert set(shapes) == {run}


def test_rank_larger_than_a_projection_and_unknown_targets_are_refused():
  module, params, _, _, _ = setup(True)
  big = lora.from_config(adapters_config(rank=17), mmdit.LORA_TARGETS)
  assert big.rank_problem(params) == (
      "config.lora.rank=17 exceeds the projection transformer_blocks_0_to_2/attn/add_k_proj "
      "(16 -> 16); choose --config.lora.rank <= 16.")
  assert lora.from_config(adapters_config(rank=16), mmdit.LORA_TARGETS).rank_problem(
      params) is None
  problem = lora.targets_problem(adapters_config(targets=("attention", "conv")),
                                 mmdit.LORA_TARGETS)
  assert "config.lora.targets=('attention', 'conv')" in problem and "'adaln'" in problem
  assert "alpha=-1.0" in lora.targets_problem(adapters_config(alpha=-1.0), mmdit.LORA_TARGETS)
  assert lora.targets_problem(adapters_config(rank=0), None) is None  # off: any model


def test_lora_on_a_model_without_adapters_is_refused(tmp_path):
  """The toy (MLP) FGM config: one line naming config.lora.rank, before anything is built."""
  c = helpers.tiny_fgm_config(str(tmp_path / "no_teacher"))
  c.lora.rank = 4
  with pytest.raises(config_checks.ConfigError) as e:
    config_checks.validate(c)
  assert str(e.value) == ("config.lora.rank=4: this model has no low-rank adapters (only the "
                          "MM-DiT has, configs/sd3_fgm.py); set --config.lora.rank=0.")
  c.lora.rank, c.fgm.init_generator = 0, "random"  # off: the ablations are untouched
  with pytest.raises(config_checks.ConfigError, match="no teacher checkpoint"):
    config_checks.validate(c)


def test_lora_file_has_diffusers_sd3_key_layout_and_refuses_another_base():
  module, params, adapters, fresh, _ = setup(True)
  trained = jax.device_get(randomise_b(fresh))
  state = sd3_lora.state_from_adapters(trained, module, adapters.scale)
  block0 = "transformer.transformer_blocks.0."
  a, b = state[block0 + "attn.to_q.lora_A.weight"], state[block0 + "attn.to_q.lora_B.weight"]
  flat = traverse_util.flatten_dict(trained)
  run = "transformer_blocks_0_to_2"
  np.testing.assert_array_equal(a, np.asarray(flat[(run, "attn", "to_q", lora.A)][0]).T)
  np.testing.assert_allclose(b, 2.0 * np.asarray(flat[(run, "attn", "to_q", lora.B)][0]).T)
  for name in ("attn.to_out.0", "attn.add_q_proj", "attn.to_add_out", "ff.net.0.proj",
               "ff.net.2", "ff_context.net.2", "norm1.linear", "norm1_context.linear"):
    assert block0 + name + ".lora_A.weight" in state, name
  last = "transformer.transformer_blocks.2."
  assert not [k for k in state if k.startswith(last + "attn.to_add_out")
              or k.startswith(last + "ff_context")]  # diffusers' last block has neither
  # The last block's context adaLN: 2 chunks (scale, shift) of the padded block's first two.
  lb = flat[(run, "norm1_context", "linear", lora.B)][2]
  np.testing.assert_allclose(state[last + "norm1_context.linear.lora_B.weight"],
                             2.0 * np.concatenate([lb[:, 16:32], lb[:, :16]], axis=1).T)
  sd3_lora.check_fits(state, PLAIN, "the file", "the tiny base")  # fits its own base
  with pytest.raises(convert_common.ConversionError) as e:
    sd3_lora.check_fits(state, dict(PLAIN, num_attention_heads=4, caption_projection_dim=32),
                        "the file", "'other'")
  assert "\n" not in str(e.value) and "LoRA for another base" in str(e.value)
  with pytest.raises(convert_common.ConversionError, match="does not have"):
    sd3_lora.check_fits(state, dict(PLAIN, num_layers=2), "the file", "'other'")
