"""Flax MM-DiT params -> diffusers folder -> PyTorch, and the converter's error reports."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import ml_collections  # noqa: E402
from flax import linen as nn  # noqa: E402

from configs import common as configs  # noqa: E402
from fgm_jax import models  # noqa: E402
from fgm_jax.convert import common  # noqa: E402
from fgm_jax.convert import diffusers as dconv  # noqa: E402
from fgm_jax.convert import mmdit_keys  # noqa: E402
from fgm_jax.models import mmdit  # noqa: E402
from tests.parity.reference.mmdit_reference import random_inputs, torch_forward  # noqa: E402

CONFIG = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
              num_attention_heads=3, joint_attention_dim=10, caption_projection_dim=24,
              pooled_projection_dim=6, out_channels=4, pos_embed_max_size=6,
              dual_attention_layers=[1], qk_norm="rms_norm")


def random_params(module, seed=0):
  """Noise of the init's shapes (zero-initialised adaLN/out layers too); no real init."""
  shapes = nn.unbox(mmdit.abstract_variables(module, height=4, width=4, text_len=2))
  flat = common.flatten(shapes["params"])
  rng = np.random.default_rng(seed)

  def noise(path, a):
    z = rng.standard_normal(a.shape).astype(np.float32)
    if path[-1] == "kernel":
      z = z / np.sqrt(np.prod(a.shape[:-1]))
    elif path[-1] == "scale":
      z = 1 + 0.2 * z
    else:
      z = 0.2 * z
    return z.astype(np.float32)
  return common.unflatten({p: noise(p, a) for p, a in flat.items()})


def inputs():
  return random_inputs(CONFIG, batch=2, height=8, width=6, text_len=5)


@pytest.fixture(scope="module")
def flax_model():
  module = mmdit.from_diffusers_config(CONFIG)
  params = random_params(module)
  x, t, cond = inputs()
  return module, params, np.asarray(jax.jit(module.apply)({"params": params}, x, t, cond))


@pytest.mark.parametrize("max_shard_bytes", [None, 20_000])
def test_flax_to_diffusers(tmp_path, flax_model, max_shard_bytes):
  module, params, ours = flax_model
  dconv.save_params(str(tmp_path), "mmdit", mmdit.diffusers_config(module), params,
                    max_shard_bytes=max_shard_bytes)
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["_class_name"] == "SD3Transformer2DModel"
  assert (tmp_path / dconv.INDEX_NAME).exists() == bool(max_shard_bytes)

  model, info = diffusers.SD3Transformer2DModel.from_pretrained(
      str(tmp_path), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info["mismatched_keys"], info
  ref = torch_forward(model.eval(), *inputs())
  err = float(np.abs(ours - ref).max() / np.abs(ref).max())
  print(f"flax->diffusers max relative error {err:.3g}")
  assert err <= 1e-5

  # And back again, bit for bit.
  _, again = dconv.load_params(str(tmp_path), "mmdit")
  for path, a in common.flatten(params).items():
    np.testing.assert_array_equal(common.flatten(again)[path], a, err_msg=str(path))


def test_registry_builds_from_config_dict():
  model_config = ml_collections.ConfigDict(configs.mmdit(**CONFIG, dtype="bfloat16"))
  module = models.build(model_config)
  assert isinstance(module, mmdit.MMDiT)
  assert module.dual_attention_layers == (1,) and module.dtype == np.dtype("bfloat16")
  with pytest.raises(ValueError, match="num_layer"):
    models.build(ml_collections.ConfigDict(configs.mmdit(**CONFIG, num_layer=2)))


# ----------------------------------------------------------------------------- bad weights


@pytest.fixture(scope="module")
def good_state(flax_model):
  return mmdit_keys.state_from_params(flax_model[1], CONFIG)


def test_bad_state_lists_every_problem(good_state):
  state = dict(good_state)
  state["transformer_blocks.1.attn.to_q.weight"] = np.zeros((24, 23), np.float32)  # shape
  del state["transformer_blocks.0.ff.net.2.bias"]  # missing
  state["transformer_blocks.0.attn.bogus.weight"] = np.zeros(3, np.float32)  # extra
  with pytest.raises(common.ConversionError) as err:
    mmdit_keys.params_from_state(state, CONFIG)
  msg = str(err.value)
  assert "transformer_blocks.1.attn.to_q.weight" in msg
  # Flax (in, out) layout, with the file's own shape beside it.
  assert "expected shape (24, 24), got shape (23, 24) (stored as (24, 23))" in msg
  assert "transformer_blocks.0.ff.net.2.bias" in msg and "missing" in msg
  assert "transformer_blocks.0.attn.bogus.weight" in msg and "unexpected" in msg
  assert "config.json" in msg  # says how to fix


def test_config_that_does_not_match_weights(tmp_path, good_state):
  # Weights of a 3-layer model announced as 2 layers: block 2's tensors are unexpected.
  dconv.write_folder(str(tmp_path), dict(CONFIG, num_layers=2), good_state)
  with pytest.raises(ValueError, match=r"transformer_blocks\.2\.attn\.to_q\.weight"):
    dconv.load_params(str(tmp_path), "mmdit")


def test_wrong_rank_is_reported_not_crashed(good_state):
  state = dict(good_state, **{"pos_embed.proj.weight": np.zeros((24, 4), np.float32)})
  with pytest.raises(common.ConversionError, match=r"pos_embed\.proj\.weight"):
    mmdit_keys.params_from_state(state, CONFIG)


def test_save_params_checks_the_tree(tmp_path, flax_model):
  params = dict(flax_model[1])
  del params["proj_out"]
  with pytest.raises(common.ConversionError, match=r"proj_out\.weight"):
    dconv.save_params(str(tmp_path), "mmdit", CONFIG, params)


# ----------------------------------------------------------------------------- folders


def test_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    dconv.read_folder(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="config.json"):
    dconv.read_folder(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(CONFIG))
  (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(FileNotFoundError, match="pickled"):
    dconv.read_folder(str(tmp_path))


def test_pipeline_folder_hint(tmp_path):
  (tmp_path / "model_index.json").write_text("{}")
  (tmp_path / "transformer").mkdir()
  (tmp_path / "transformer" / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="transformer"):
    dconv.read_folder(str(tmp_path))


def test_missing_shard_is_reported(tmp_path, good_state):
  dconv.write_folder(str(tmp_path), CONFIG, good_state, max_shard_bytes=4_000)
  shards = sorted(tmp_path.glob("*-of-*.safetensors"))
  assert len(shards) > 2
  shards[1].unlink()
  with pytest.raises(FileNotFoundError, match=shards[1].name):
    dconv.read_folder(str(tmp_path))


def test_unknown_kind(tmp_path):
  with pytest.raises(ValueError, match="unet"):
    dconv.load_params(str(tmp_path), "unet")
