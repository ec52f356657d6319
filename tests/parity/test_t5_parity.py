"""Numerical parity of fgm_jax's T5 encoder with transformers' T5EncoderModel.

Tiny random PyTorch models are saved with ``save_pretrained`` (safetensors), read back as
numpy, mapped with ``t5_keys`` and run on the same token ids. Every parameter is
randomised (the relative bias table and norm scales included), and sequences are longer
than ``relative_attention_max_distance`` so the log-spaced and clipped buckets are used.
"""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import linen as nn  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from fgm_jax.convert import common, t5_keys  # noqa: E402
from fgm_jax.models import t5  # noqa: E402

RTOL = 1e-5  # fp32: max |ours - torch| / max |torch|
BF16_RTOL = 3e-2

# T5 v1.1 (gated GELU) with a small max distance: offsets up to 39 cross 16.
V1_1 = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
            relative_attention_num_buckets=32, relative_attention_max_distance=16,
            feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6)
# Original-T5 style ReLU feed-forward, default distance, odd bucket count and eps.
RELU = dict(V1_1, num_layers=2, d_kv=6, relative_attention_num_buckets=20,
            relative_attention_max_distance=128, feed_forward_proj="relu",
            layer_norm_epsilon=1e-5)
CONFIGS = {"v1_1": V1_1, "relu": RELU}
BATCH, LENGTH = 3, 40


def randomise(model, seed=0):
  """Non-trivial values for every parameter, scaled to keep activations O(1)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "relative_attention_bias" in name or name == "shared.weight":
        p.copy_(noise)
      elif p.ndim == 2:
        p.copy_(noise / np.sqrt(p.shape[1]))
      else:  # RMS-norm scales around 1
        p.copy_(1 + 0.2 * noise)
  return model.eval()


def torch_model(config, seed=0):
  torch.manual_seed(seed)
  return randomise(transformers.T5EncoderModel(
      transformers.T5Config(dropout_rate=0.0, **config)), seed)


def read_folder(folder):
  with open(os.path.join(folder, "config.json")) as f:
    config = json.load(f)
  return config, load_file(os.path.join(folder, "model.safetensors"))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
  """(name, torch model, folder, config.json dict, flax params) of one tiny T5."""
  name = request.param
  model = torch_model(CONFIGS[name])
  folder = str(tmp_path_factory.mktemp(f"t5_{name}"))
  model.save_pretrained(folder, safe_serialization=True)
  config, state = read_folder(folder)
  return name, model, folder, config, t5_keys.params_from_state(state, config)


def token_ids(vocab, seed=0, batch=BATCH, length=LENGTH):
  return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int32)


def padding_mask(batch=BATCH, length=LENGTH):
  lengths = np.linspace(length, 5, batch).astype(int)  # full, partial, short rows
  return (np.arange(length)[None] < lengths[:, None]).astype(np.int32)


def torch_forward(model, ids, mask=None):
  with torch.no_grad():
    mask = None if mask is None else torch.tensor(mask, dtype=torch.long)
    return model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=mask)[0].numpy()


def flax_forward(config, params, ids, mask=None, dtype=jnp.float32):
  module = t5.from_transformers_config(config, dtype=dtype)
  return np.asarray(jax.jit(module.apply)({"params": params}, ids, mask))


def rel_err(ours, ref):
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (32, 16), (20, 128), (8, 9)])
def test_relative_buckets_match_transformers(num_buckets, max_distance):
  rel = torch.arange(-600, 601)[None]
  want = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
      rel, bidirectional=True, num_buckets=num_buckets, max_distance=max_distance)
  got = t5.relative_position_bucket(rel.numpy(), num_buckets, max_distance)
  np.testing.assert_array_equal(got, want.numpy())


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
def test_parity_with_transformers(case, masked):
  name, model, _, config, params = case
  ids = token_ids(config["vocab_size"])
  mask = padding_mask() if masked else None
  ref = torch_forward(model, ids, mask)
  ours = flax_forward(config, params, ids, mask)
  assert ours.shape == (BATCH, LENGTH, config["d_model"]) and ours.dtype == np.float32
  err = rel_err(ours, ref)
  print(f"{name} mask={masked}: max relative error {err:.3g}")
  assert err <= RTOL, f"{name} mask={masked}: relative error {err}"
  if masked:  # the mask must matter, or the masked test proves nothing
    assert rel_err(flax_forward(config, params, ids), ref) > 1e-2


def test_bfloat16_compute_is_close(case):
  name, model, _, config, params = case
  ids, mask = token_ids(config["vocab_size"], seed=1), padding_mask()
  ref = torch_forward(model, ids, mask)
  ours = flax_forward(config, params, ids, mask, dtype=jnp.bfloat16)
  assert ours.dtype == np.float32 and np.isfinite(ours).all()
  err = rel_err(ours, ref)
  print(f"{name} bf16: max relative error {err:.3g}")
  assert err < BF16_RTOL, f"{name} bf16: relative error {err}"


def test_param_count_and_round_trip(case):
  _, model, folder, config, params = case
  assert t5.param_count(t5.from_transformers_config(config)) == sum(
      p.numel() for p in model.parameters())
  _, state = read_folder(folder)
  back = t5_keys.state_from_params(params, config)
  assert sorted(back) == sorted(state)
  for k, v in state.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_tied_copy_and_decoder_keys_are_accepted(case):
  _, _, folder, config, params = case
  _, state = read_folder(folder)
  state = dict(state)
  state[t5_keys.TIED_COPY] = state.pop(t5_keys.SHARED)  # only the encoder's tied name
  state["decoder.final_layer_norm.weight"] = np.ones(config["d_model"], np.float32)
  state["lm_head.weight"] = np.zeros((config["vocab_size"], config["d_model"]), np.float32)
  got = t5_keys.params_from_state(state, config)
  np.testing.assert_array_equal(got["shared"], params["shared"])
  # Both names present: shared.weight wins over a (stale) copy.
  state[t5_keys.SHARED] = np.asarray(params["shared"])
  state[t5_keys.TIED_COPY] = np.zeros_like(params["shared"])
  np.testing.assert_array_equal(t5_keys.params_from_state(state, config)["shared"],
                                params["shared"])


def test_wrong_shape_names_the_key(case):
  _, _, folder, config, _ = case
  _, state = read_folder(folder)
  key = "encoder.block.1.layer.0.SelfAttention.q.weight"
  inner = config["num_heads"] * config["d_kv"]
  state = dict(state, **{key: np.zeros((inner + 4, config["d_model"]), np.float32)})
  del state["encoder.final_layer_norm.weight"]
  with pytest.raises(common.ConversionError) as info:
    t5_keys.params_from_state(state, config)
  msg = str(info.value)
  assert key in msg and f"({config['d_model']}, {inner})" in msg
  assert f"({config['d_model']}, {inner + 4})" in msg and f"({inner + 4}, " in msg
  assert "encoder.final_layer_norm.weight" in msg and "missing" in msg


def test_config_errors():
  with pytest.raises(ValueError, match="feed_forward_proj"):
    t5.from_transformers_config(dict(V1_1, feed_forward_proj="fancy-gelu"))
  with pytest.raises(ValueError, match="not supported"):
    t5.from_transformers_config(dict(V1_1, feed_forward_proj="gated-mish"))
  assert t5.from_transformers_config(V1_1).dense_act_fn == "gelu_new"
  assert t5.from_transformers_config(dict(V1_1, feed_forward_proj="gated-relu")).is_gated_act


@pytest.mark.skipif(jax.device_count() < 8, reason="needs the 8 fake CPU devices of conftest")
@pytest.mark.parametrize("shape,rules", [
    ((2, 4), t5.LOGICAL_RULES), ((2, 2, 2), t5.TENSOR_LOGICAL_RULES)], ids=["fsdp", "tensor"])
def test_sharded_forward_matches(shape, rules):
  config = V1_1
  module = t5.from_transformers_config(config)
  abstract = t5.abstract_variables(module, length=LENGTH)
  state = {k: v.numpy() for k, v in torch_model(config, seed=2).state_dict().items()}
  params = t5_keys.params_from_state(state, config)
  ids = token_ids(config["vocab_size"], seed=2, batch=8)
  want = flax_forward(config, params, ids)

  mesh = Mesh(np.array(jax.devices()[:8]).reshape(shape), ("data", "fsdp", "tensor")[:len(shape)])
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
  sharded = jax.device_put(params, shardings["params"])
  q = sharded["block_0"]["attn"]["q"]["kernel"]
  assert q.sharding.spec == (P("fsdp", "tensor") if len(shape) == 3 else P("fsdp", None))
  assert sharded["shared"].sharding.spec == P(None, "fsdp")
  ids = jax.device_put(ids, NamedSharding(mesh, P(("data", "fsdp"))))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    got = np.asarray(jax.jit(module.apply)({"params": sharded}, ids))
  assert rel_err(got, want) <= 1e-5


def test_transformers_folder_loader(case):
  loader = pytest.importorskip("fgm_jax.convert.transformers_folder")
  if not hasattr(loader, "load_params"):
    pytest.skip("transformers_folder.load_params not written yet")
  _, model, folder, config, params = case
  loaded_config, loaded_params = loader.load_params(folder, "t5_encoder")
  assert loaded_config["num_layers"] == config["num_layers"]
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded_params, params)
  ids = token_ids(config["vocab_size"], seed=3)
  assert rel_err(flax_forward(loaded_config, loaded_params, ids),
                 torch_forward(model, ids)) <= RTOL
