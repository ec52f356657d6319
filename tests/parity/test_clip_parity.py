"""Numerical parity of fgm_jax's CLIP text encoder with transformers' CLIPTextModelWithProjection.

Tiny random PyTorch models are saved with ``save_pretrained`` (safetensors; one sharded),
loaded with ``fgm_jax.convert.transformers_folder.load_params`` and run on the same tokens.
Every parameter is randomised (LayerNorms and biases too), and the token batches are built
so that the two EOS-pooling rules pick different positions: a port using the wrong rule
for a config could not pass.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import linen as nn  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from fgm_jax.convert import clip_keys  # noqa: E402
from fgm_jax.convert import common  # noqa: E402
from fgm_jax.convert import transformers_folder as tf  # noqa: E402
from fgm_jax.models import clip  # noqa: E402

RTOL = 1e-5  # fp32: max |ours - torch| / max |torch|
VOCAB = 100

# CLIP-L/14-like: quick_gelu and the legacy eos_token_id=2 (pool at the largest id).
CLIP_L_LIKE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, projection_dim=24,
                   num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                   hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=2,
                   bos_token_id=0, pad_token_id=1)
# bigG/14-like: exact GELU, a real eos id (pool at its first occurrence), 3 layers.
BIG_G_LIKE = dict(CLIP_L_LIKE, intermediate_size=80, num_hidden_layers=3, hidden_act="gelu",
                  layer_norm_eps=1e-6, eos_token_id=VOCAB - 3, pad_token_id=VOCAB - 3)


def randomise(model, seed):
  """Every parameter non-trivial, scaled to keep activations O(1)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "embedding" in name:
        p.copy_(noise)
      elif p.ndim >= 2:
        p.copy_(noise / np.sqrt(p.shape[1]))
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1 + 0.2 * noise)
      else:
        p.copy_(0.2 * noise)
  return model.eval()


def torch_model(config, seed):
  hf = transformers.CLIPTextConfig(**config)
  torch.manual_seed(seed)
  return randomise(transformers.CLIPTextModelWithProjection(hf), seed)


def tokens(config, length, seed):
  """Rows ending at different EOS positions, with decoys for the other pooling rule.

  Legacy (eos id 2): the largest id (VOCAB - 1, CLIP's end-of-text) ends the text and pads
  the first row; earlier 2s would fool the first-eos rule. Otherwise the eos id ends the
  text and pads; an earlier VOCAB - 1 would fool the argmax rule.
  """
  rng = np.random.default_rng(seed)
  eos = config["eos_token_id"]
  legacy = eos == 2
  end, decoy = (VOCAB - 1, 2) if legacy else (eos, VOCAB - 1)
  ends = [length - 1, 3, length // 2, 1]
  rows = []
  for i, e in enumerate(ends):
    row = rng.integers(3, VOCAB - 3, size=length)
    row[0] = 0  # bos
    row[e] = end
    row[e + 1:] = end if i % 2 == 0 else 1  # pad with eos (CLIP-L tokenizer) or pad id
    if e > 1:
      row[1] = decoy
    rows.append(row)
  return np.stack(rows).astype(np.int32), np.array(ends)


def torch_outputs(model, ids):
  with torch.no_grad():
    out = model(torch.from_numpy(ids).long(), output_hidden_states=True)
  return {"hidden_states": [h.numpy() for h in out.hidden_states],
          "last_hidden_state": out.last_hidden_state.numpy(),
          "text_embeds": out.text_embeds.numpy()}


def flax_outputs(config, params, ids):
  module = clip.from_transformers_config(config)
  return jax.device_get(jax.jit(module.apply)({"params": params}, ids))


def rel_err(ours, ref):
  return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def errors(ours, ref):
  errs = {f"hidden_states[{i}]": rel_err(o, r)
          for i, (o, r) in enumerate(zip(ours["hidden_states"], ref["hidden_states"]))}
  errs["last_hidden_state"] = rel_err(ours["last_hidden_state"], ref["last_hidden_state"])
  errs["text_embeds"] = rel_err(ours["text_embeds"], ref["text_embeds"])
  return errs


# (name, config, token length, save kwargs)
CASES = {
    "clip_l_like": (CLIP_L_LIKE, 77, {}),
    "big_g_like": (BIG_G_LIKE, 16, {}),
    "big_g_like_sharded": (BIG_G_LIKE, 9, {"max_shard_size": "20KB"}),
}


_SAVED = {}


def save_case(name, tmp_path_factory):
  """(name, folder, torch model, token ids, eos positions), saved once per module run."""
  if name not in _SAVED:
    config, length, save_kw = CASES[name]
    folder = tmp_path_factory.mktemp(name)
    model = torch_model(config, seed=len(name))
    model.save_pretrained(folder, safe_serialization=True, **save_kw)
    ids, ends = tokens(config, length, seed=len(name))
    _SAVED[name] = (name, folder, model, ids, ends)
  return _SAVED[name]


@pytest.fixture(scope="module", params=sorted(CASES))
def saved(request, tmp_path_factory):
  return save_case(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def clip_l(tmp_path_factory):
  return save_case("clip_l_like", tmp_path_factory)


def test_parity_with_transformers(saved):
  name, folder, model, ids, ends = saved
  config, params = tf.load_params(str(folder), "clip_text")
  assert config["architectures"] == ["CLIPTextModelWithProjection"]
  if "sharded" in name:
    assert (folder / tf.INDEX_NAME).exists()
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1

  ref = torch_outputs(model, ids)
  ours = flax_outputs(config, params, ids)
  assert len(ours["hidden_states"]) == config["num_hidden_layers"] + 1
  np.testing.assert_array_equal(
      np.asarray(clip.eos_positions(ids, config["eos_token_id"])), ends)
  wrong_rule = ((ids == 2).argmax(-1) if config["eos_token_id"] == 2 else ids.argmax(-1))
  assert (wrong_rule != ends).any()  # the batch tells the two pooling rules apart
  errs = errors(ours, ref)
  print(f"{name}: " + ", ".join(f"{k} {v:.2g}" for k, v in errs.items()))
  assert max(errs.values()) <= RTOL, f"{name}: {errs}"
  # pooled is the final-normed state at the EOS token
  np.testing.assert_allclose(
      ours["pooled"], np.asarray(ours["last_hidden_state"])[np.arange(len(ids)), ends])


def test_state_roundtrip(saved):
  _, folder, model, _, _ = saved
  config, state = tf.read_folder(str(folder))
  params = clip_keys.params_from_state(state, config)
  back = clip_keys.state_from_params(params, config)
  want = {k: v.numpy() for k, v in model.state_dict().items() if "position_ids" not in k}
  assert sorted(back) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(back[k], want[k], err_msg=k)


def test_position_ids_buffer_and_plain_clip_text_model(clip_l):
  # Older exports store the position_ids buffer; transformers 5's plain CLIPTextModel
  # drops the 'text_model.' prefix and has no projection.
  _, folder, model, ids, _ = clip_l
  config, state = tf.read_folder(str(folder))
  state = dict(state, **{"text_model.embeddings.position_ids": np.arange(77)[None]})
  assert clip_keys.params_from_state(state, config)
  plain_config = dict(config, architectures=["CLIPTextModel"])
  plain = {k[len("text_model."):]: v for k, v in state.items() if k.startswith("text_model.")}
  params = clip_keys.params_from_state(plain, plain_config)
  assert "text_projection" not in params
  out = flax_outputs(plain_config, params, ids)
  assert "text_embeds" not in out
  ref = torch_outputs(model, ids)
  assert rel_err(out["last_hidden_state"], ref["last_hidden_state"]) <= RTOL
  with pytest.raises(common.ConversionError, match="CLIPTextModelWithProjection"):
    clip_keys.params_from_state(state, plain_config)  # has a projection the config lacks


def test_wrong_shape_names_key_and_shapes():
  config = dict(CLIP_L_LIKE, architectures=["CLIPTextModelWithProjection"])
  module = clip.from_transformers_config(config)
  shapes = common.shape_tree(nn.unbox(clip.abstract_variables(module))["params"])
  params = common.unflatten({p: np.zeros(s, np.float32) for p, s in shapes.items()})
  state = clip_keys.state_from_params(params, config)
  state["text_model.encoder.layers.1.mlp.fc1.weight"] = np.zeros((48, 32), np.float32)
  with pytest.raises(common.ConversionError,
                     match=r"text_model\.encoder\.layers\.1\.mlp\.fc1\.weight.*"
                           r"expected shape \(32, 64\), got shape \(32, 48\) "
                           r"\(stored as \(48, 32\)\)"):
    clip_keys.params_from_state(state, config)
  del state["text_projection.weight"]
  with pytest.raises(common.ConversionError, match=r"text_projection\.weight"):
    clip_keys.params_from_state(state, config)


def test_other_architecture_is_refused(tmp_path):
  bert = transformers.BertModel(transformers.BertConfig(
      vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
      intermediate_size=16, max_position_embeddings=16))
  bert.save_pretrained(tmp_path, safe_serialization=True)
  with pytest.raises(common.ConversionError,
                     match=r"(?s)config\.json.*BertModel.*'bert'.*CLIPTextModelWithProjection"):
    tf.load_params(str(tmp_path), "clip_text")


def test_clip_folder_is_not_t5(clip_l):
  # Refused from config.json alone, before any T5 key module is imported.
  _, folder, _, _, _ = clip_l
  with pytest.raises(common.ConversionError,
                     match=r"(?s)CLIPTextModelWithProjection.*T5EncoderModel"):
    tf.load_params(str(folder), "t5_encoder")


def test_model_type_checked_without_architectures(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
  with pytest.raises(common.ConversionError, match="'t5'.*clip_text_model"):
    tf.load_params(str(tmp_path), "clip_text")


def test_folder_errors(tmp_path):
  with pytest.raises(common.ConversionError, match="does not exist"):
    tf.load_params(str(tmp_path / "nope"), "clip_text")
  with pytest.raises(common.ConversionError, match="config.json"):
    tf.load_params(str(tmp_path), "clip_text")
  (tmp_path / "config.json").write_text(json.dumps(
      dict(CLIP_L_LIKE, architectures=["CLIPTextModelWithProjection"],
           model_type="clip_text_model")))
  with pytest.raises(common.ConversionError, match="No model.safetensors"):
    tf.load_params(str(tmp_path), "clip_text")
  (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(common.ConversionError, match="pickled"):
    tf.load_params(str(tmp_path), "clip_text")
  with pytest.raises(ValueError, match="clip_text"):
    tf.load_params(str(tmp_path), "clip_vision")


def test_pipeline_folder_hint(tmp_path):
  (tmp_path / "model_index.json").write_text("{}")
  (tmp_path / "text_encoder").mkdir()
  (tmp_path / "text_encoder" / "config.json").write_text("{}")
  with pytest.raises(common.ConversionError, match="text_encoder"):
    tf.load_params(str(tmp_path), "clip_text")


def test_sd3_sizes():
  # Parameter counts of the real encoders (text transformer + projection).
  assert clip.param_count(clip.from_transformers_config(clip.CLIP_L)) == 123_650_304
  assert clip.param_count(clip.from_transformers_config(clip.CLIP_G)) == 694_659_840


def test_too_long_input_is_refused():
  module = clip.from_transformers_config(dict(CLIP_L_LIKE, max_position_embeddings=8))
  with pytest.raises(ValueError, match="max_position_embeddings=8"):
    clip.abstract_variables(module, length=9)


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (fake CPU) devices")
@pytest.mark.parametrize("shape,axes,rules,fc1_spec", [
    ((1, 4), ("data", "fsdp"), clip.LOGICAL_RULES, P("fsdp", None)),
    ((1, 2, 2), ("data", "fsdp", "tensor"), clip.TENSOR_LOGICAL_RULES, P("fsdp", "tensor")),
])
def test_sharded_forward_is_unchanged(shape, axes, rules, fc1_spec):
  config = BIG_G_LIKE
  module = clip.from_transformers_config(config)
  abstract = clip.abstract_variables(module, batch=4, length=9)
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda a: (rng.standard_normal(a.shape) / np.sqrt(a.shape[0])).astype(np.float32),
      nn.unbox(abstract)["params"])
  ids, _ = tokens(config, 9, seed=0)
  want = jax.jit(module.apply)({"params": params}, ids)
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(shape), axes)
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
  sharded = jax.device_put(params, shardings["params"])
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    got = jax.jit(module.apply)({"params": sharded},
                                jax.device_put(ids, NamedSharding(mesh, P(("data", "fsdp")))))
  assert sharded["layers_0"]["mlp"]["fc1"]["kernel"].sharding.spec == fc1_spec
  assert sharded["token_embedding"].sharding.spec == P(None, "fsdp")
  for key in ("last_hidden_state", "text_embeds"):
    np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), rtol=1e-5,
                               atol=1e-5, err_msg=key)


def test_bfloat16_compute_is_close(clip_l):
  # Loose sanity check that the bf16 path runs and stays near the fp32 reference.
  _, folder, model, ids, _ = clip_l
  config, params = tf.load_params(str(folder), "clip_text")
  module = clip.from_transformers_config(config, dtype="bfloat16")
  out = jax.jit(module.apply)({"params": params}, ids)
  assert out["text_embeds"].dtype == jnp.bfloat16
  ref = torch_outputs(model, ids)
  assert rel_err(np.asarray(out["text_embeds"], np.float32), ref["text_embeds"]) < 5e-2
