"""Numerical parity of fgm_jax's MM-DiT with diffusers' SD3Transformer2DModel.

Tiny random PyTorch models are saved with ``save_pretrained`` (safetensors), loaded with
``fgm_jax.convert.diffusers.load_params`` and run on the same random inputs. Every
parameter is randomised, including the adaLN/output layers that real inits set to zero,
so a port that ignored them could not pass.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from fgm_jax.convert import diffusers as dconv  # noqa: E402
from fgm_jax.convert import mmdit_keys  # noqa: E402
from fgm_jax.models import mmdit  # noqa: E402
from tests.parity.reference.mmdit_reference import random_inputs, torch_forward  # noqa: E402

RTOL = 1e-5  # fp32: max |ours - torch| / max |torch|

SD3_MEDIUM_LIKE = dict(
    sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
    num_attention_heads=4, joint_attention_dim=24, caption_projection_dim=32,
    pooled_projection_dim=20, out_channels=4, pos_embed_max_size=8,
    dual_attention_layers=(), qk_norm=None)

SD35_LIKE = dict(SD3_MEDIUM_LIKE, num_layers=4, dual_attention_layers=(0, 2),
                 qk_norm="rms_norm", pos_embed_max_size=12)

# Patch 3, 5 heads of 4 channels, in != out channels, 9x15 latents (a 3x5 patch grid
# centre-cropped from a 7x7 table at odd offsets), base size 4 != grid.
ODD = dict(sample_size=12, patch_size=3, in_channels=5, num_layers=2, attention_head_dim=4,
           num_attention_heads=5, joint_attention_dim=7, caption_projection_dim=20,
           pooled_projection_dim=3, out_channels=3, pos_embed_max_size=7,
           dual_attention_layers=(1,), qk_norm="rms_norm")


def randomise(model, seed=0):
  """Fills every parameter with non-trivial values scaled to keep activations O(1)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim >= 2:  # weights: variance-preserving
        p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
      elif "norm_" in name and name.endswith("weight"):  # RMSNorm scales around 1
        p.copy_(1 + 0.2 * noise)
      else:
        p.copy_(0.2 * noise)
  return model.eval()


def torch_model(config, seed=0):
  torch.manual_seed(seed)
  return randomise(diffusers.SD3Transformer2DModel(**config), seed)




def flax_forward(config, params, x, t, cond, dtype=np.float32):
  # One jit compile is much cheaper on CPU than dispatching every op eagerly.
  module = mmdit.from_diffusers_config(config, dtype=dtype)
  return np.asarray(jax.jit(module.apply)({"params": params}, x, t, cond))


def rel_err(ours, ref):
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("name,config,shape", [
    ("sd3_medium_like", SD3_MEDIUM_LIKE, (2, 8, 8, 6)),
    ("sd35_like", SD35_LIKE, (2, 8, 8, 5)),
    ("odd_sizes", ODD, (2, 9, 15, 7)),
])
def test_parity_with_diffusers(tmp_path, name, config, shape):
  batch, height, width, text_len = shape
  model = torch_model(config)
  model.save_pretrained(tmp_path, safe_serialization=True)
  loaded_config, params = dconv.load_params(str(tmp_path), "mmdit")
  assert loaded_config["num_layers"] == config["num_layers"]

  x, t, cond = random_inputs(config, batch, height, width, text_len)
  ref = torch_forward(model, x, t, cond)
  ours = flax_forward(loaded_config, params, x, t, cond)
  assert ours.shape == x.shape[:3] + (config["out_channels"],)
  err = rel_err(ours, ref)
  print(f"{name}: max relative error {err:.3g}")
  assert err <= RTOL, f"{name}: relative error {err}"


def test_sharded_checkpoint_loads(tmp_path):
  model = torch_model(SD35_LIKE, seed=1)
  model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
  assert (tmp_path / dconv.INDEX_NAME).exists()
  assert len(list(tmp_path.glob("*.safetensors"))) > 1
  config, params = dconv.load_params(str(tmp_path), "mmdit")
  x, t, cond = random_inputs(SD35_LIKE, 1, 8, 8, 3, seed=1)
  err = rel_err(flax_forward(config, params, x, t, cond), torch_forward(model, x, t, cond))
  assert err <= RTOL


def test_param_count_matches_torch():
  # diffusers counts the positional table as a buffer, we keep it in params.
  model = torch_model(SD35_LIKE)
  n_torch = sum(p.numel() for p in model.parameters())
  table = SD35_LIKE["pos_embed_max_size"] ** 2 * 32
  assert mmdit.param_count(mmdit.from_diffusers_config(SD35_LIKE)) == n_torch + table


def test_bfloat16_compute_is_close():
  # Loose sanity check that the bf16 path runs and stays near the fp32 result.
  model = torch_model(SD3_MEDIUM_LIKE)
  params = mmdit_keys.params_from_state(
      {k: v.numpy() for k, v in model.state_dict().items()}, SD3_MEDIUM_LIKE)
  x, t, cond = random_inputs(SD3_MEDIUM_LIKE, 2, 8, 8, 4)
  ref = torch_forward(model, x, t, cond)
  ours = flax_forward(SD3_MEDIUM_LIKE, params, x, t, cond, dtype=jnp.bfloat16)
  assert ours.dtype == np.float32
  assert rel_err(ours, ref) < 0.05


def test_remat_keeps_params_and_outputs():
  # Checks names, outputs and that the backward really rematerialises; gradient values
  # of jax.checkpoint are JAX's business (and compiling three backward passes is slow).
  config = dict(SD35_LIKE, num_layers=2, dual_attention_layers=(0,))
  model = torch_model(config)
  params = mmdit_keys.params_from_state(
      {k: v.numpy() for k, v in model.state_dict().items()}, config)
  x, t, cond = random_inputs(config, 1, 4, 4, 2)
  base = mmdit.from_diffusers_config(config)
  want = flax_forward(config, params, x, t, cond)
  for remat in ("full", "dots"):
    module = mmdit.from_diffusers_config(config, remat=remat)
    assert (jax.tree_util.tree_structure(mmdit.abstract_variables(module)) ==
            jax.tree_util.tree_structure(mmdit.abstract_variables(base)))
    got = np.asarray(jax.jit(module.apply)({"params": params}, x, t, cond))
    assert rel_err(got, want) <= 1e-6, remat
    loss = lambda p, m=module: jnp.sum(m.apply({"params": p}, x, t, cond) ** 2)
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
    assert "remat" in jaxpr or "checkpoint" in jaxpr, remat
