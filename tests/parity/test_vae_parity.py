"""Parity of fgm_jax.models.vae with diffusers' AutoencoderKL on tiny random models (fp32).

Each config builds a random PyTorch AutoencoderKL, saves it with ``save_pretrained``
(safetensors), loads it through ``fgm_jax.convert.diffusers.load_params`` and compares
encode (mean, logvar) and decode outputs; then goes back the other way through
``save_params`` and ``AutoencoderKL.from_pretrained``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from fgm_jax.convert import common, vae_keys  # noqa: E402
from fgm_jax.convert import diffusers as dconv  # noqa: E402
from fgm_jax.models import vae  # noqa: E402

TOL = 1e-5  # max |ours - torch| / max |torch|, fp32

CONFIGS = {
    # SD3's layout, shrunk: 16 latents, no quant convs, shift and scale, 2 resnets per level.
    "sd3_like": dict(
        in_channels=3, out_channels=3, block_out_channels=[32, 64], layers_per_block=2,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=16, norm_num_groups=8, sample_size=16, scaling_factor=1.5305,
        shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
    # SD1/SDXL's layout: quant convs, 3 levels, one width repeated, no shift.
    "quant_convs": dict(
        in_channels=3, out_channels=3, block_out_channels=[16, 32, 32], layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
        latent_channels=4, norm_num_groups=8, sample_size=16, scaling_factor=0.18215,
        use_quant_conv=True, use_post_quant_conv=True),
}
IMAGE = 16
BATCH = 2


def _rel_err(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-12))


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(t):
  return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def _torch_vae(config, seed=0):
  """A random diffusers VAE whose norms and biases are not at their trivial init."""
  torch.manual_seed(seed)
  model = diffusers.AutoencoderKL(**config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


def _jitted(module, method):
  return jax.jit(functools.partial(module.apply, method=getattr(module, method)))


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
  """name -> built case, each built (and its encode/decode compiled) once per module."""
  built = {}

  def get(name):
    if name not in built:
      folder = tmp_path_factory.mktemp(name)
      model = _torch_vae(CONFIGS[name])
      model.save_pretrained(folder, safe_serialization=True)
      config, params = dconv.load_params(str(folder), "vae")
      module = vae.from_config(config)
      built[name] = dict(name=name, model=model, config=config, params=params, module=module,
                         encode=_jitted(module, "encode"), decode=_jitted(module, "decode"))
    return built[name]

  return get


@pytest.fixture(params=sorted(CONFIGS))
def case(request, cases):
  return cases(request.param)


@pytest.fixture
def sd3_case(cases):
  return cases("sd3_like")


def _inputs(config, seed=1):
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, (BATCH, IMAGE, IMAGE, config["in_channels"])).astype(np.float32)
  down = 2 ** (len(config["block_out_channels"]) - 1)
  z = rng.standard_normal(
      (BATCH, IMAGE // down, IMAGE // down, config["latent_channels"])).astype(np.float32)
  return x, z


def test_encode_decode_match_diffusers(case):
  x, z = _inputs(case["config"])
  with torch.no_grad():
    post = case["model"].encode(_nchw(x)).latent_dist
    ref_mean, ref_logvar = _nhwc(post.mean), _nhwc(post.logvar)
    ref_image = _nhwc(case["model"].decode(_nchw(z)).sample)
  mean, logvar = case["encode"](case["params"], x)
  image = case["decode"](case["params"], z)
  errs = {"mean": _rel_err(mean, ref_mean), "logvar": _rel_err(logvar, ref_logvar),
          "decode": _rel_err(image, ref_image)}
  abs_errs = {k: float(np.max(np.abs(np.asarray(a) - b))) for k, a, b in
              (("mean", mean, ref_mean), ("logvar", logvar, ref_logvar),
               ("decode", image, ref_image))}
  print(f"\n{case['name']} parity: max abs err / max abs ref {errs}; max abs err {abs_errs}")
  assert max(errs.values()) <= TOL, errs


def test_latent_scaling_helpers(sd3_case):
  """latents = (mean - shift) * scale; images_from_latents undoes it before decoding."""
  case = sd3_case
  module, params, model = case["module"], case["params"], case["model"]
  x, z = _inputs(case["config"], seed=2)
  shift = case["config"].get("shift_factor") or 0.0
  scale = case["config"]["scaling_factor"]
  with torch.no_grad():
    ref_mean = _nhwc(model.encode(_nchw(x)).latent_dist.mean)
    ref_image = _nhwc(model.decode(_nchw(z / scale + shift)).sample)


  @jax.jit  # one compile for all three helper calls
  def helpers(params, x, z, key):
    return (vae.latents_from_images(module, params, x),
            vae.latents_from_images(module, params, x, rng=key),
            vae.images_from_latents(module, params, z))

  key = jax.random.PRNGKey(0)
  latents, s1, images = helpers(params, x, z, key)
  assert _rel_err(latents, (ref_mean - shift) * scale) <= TOL
  assert _rel_err(images, ref_image) <= TOL
  # A posterior sample: keyed by rng, the same key gives the same sample, not the mean.
  _, s2, _ = helpers(params, x, z, key)
  np.testing.assert_array_equal(s1, s2)
  assert s1.shape == latents.shape and not np.allclose(s1, latents)


def test_state_round_trip_is_exact(case):
  state = vae_keys.state_from_params(case["params"], case["config"])
  want = {k: v.detach().numpy() for k, v in case["model"].state_dict().items()}
  assert sorted(state) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(state[k], want[k], err_msg=k)


def test_exported_folder_loads_in_diffusers(case, tmp_path):
  """Fresh Flax params -> save_params -> AutoencoderKL.from_pretrained -> same decode."""
  config = case["config"]
  # Random values of the right shapes (norms and biases included); no init pass needed.
  rng = np.random.default_rng(3)
  params = jax.tree_util.tree_map(
      lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32),
      vae.param_shapes(case["module"]))
  dconv.save_params(str(tmp_path), "vae", config, params)
  model = diffusers.AutoencoderKL.from_pretrained(str(tmp_path)).eval()
  _, z = _inputs(config, seed=5)
  with torch.no_grad():
    ref = _nhwc(model.decode(_nchw(z)).sample)
  err = _rel_err(case["decode"](params, z), ref)
  print(f"\n{case['name']} exported-folder decode parity: {err:.3g}")
  assert err <= TOL


def test_wrong_shape_and_missing_keys_are_all_named():
  config = CONFIGS["sd3_like"]
  state = {k: v.detach().numpy() for k, v in _torch_vae(config).state_dict().items()}
  state["encoder.conv_in.weight"] = np.zeros((32, 4, 3, 3), np.float32)  # 4 input channels
  del state["decoder.conv_out.bias"]
  state["decoder.extra.weight"] = np.zeros((1,), np.float32)
  with pytest.raises(common.ConversionError) as err:
    vae_keys.params_from_state(state, config)
  msg = str(err.value)
  assert "encoder.conv_in.weight" in msg
  assert "expected shape (3, 3, 3, 32), got shape (3, 3, 4, 32)" in msg
  assert "decoder.conv_out.bias" in msg and "decoder.extra.weight" in msg


def test_params_for_another_config_are_rejected_on_export():
  sd3, quant = CONFIGS["sd3_like"], CONFIGS["quant_convs"]
  params = vae.param_shapes(vae.from_config(quant))
  params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), params)
  with pytest.raises(common.ConversionError, match="quant_conv"):
    vae_keys.state_from_params(params, sd3)


def test_legacy_attention_names_load():
  config = CONFIGS["sd3_like"]
  state = {k: v.detach().numpy() for k, v in _torch_vae(config).state_dict().items()}
  new = vae_keys.params_from_state(state, config)
  old = {}
  for k, v in state.items():
    for a, b in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
      if f".attentions.0.{a}." in k:
        k = k.replace(f".{a}.", f".{b}.")
        v = v[:, :, None, None] if v.ndim == 2 else v  # old exports stored 1x1 convs
    old[k] = v
  jax.tree_util.tree_map(np.testing.assert_array_equal, vae_keys.params_from_state(old, config),
                         new)


def test_unsupported_config_names_the_key():
  bad = dict(CONFIGS["sd3_like"], up_block_types=["AttnUpDecoderBlock2D"] * 2)
  with pytest.raises(ValueError, match="up_block_types"):
    vae.from_config(bad)


def test_bfloat16_compute_stays_close(sd3_case):
  case = sd3_case
  module = vae.from_config(dict(case["config"], dtype="bfloat16"))
  x, z = _inputs(case["config"], seed=6)
  mean32, _ = case["encode"](case["params"], x)
  mean16, _ = _jitted(module, "encode")(case["params"], x)
  assert mean16.dtype == jnp.bfloat16
  assert _rel_err(mean16.astype(jnp.float32), mean32) < 5e-2
