"""Import of RectifiedFlow's CIFAR-10 teacher (fgm_jax/convert/rectified_flow.py) against an
independent PyTorch NCSN++ (tests/parity/reference/rf_reference.py), on random weights.

(a) every key and shape of the published network equals the reference's state dict;
(b) the converted narrow network gives the reference's velocity, v = -u(x, 999 (1 - t));
(c) a file in their exact format converts through the function and the command line into a
    workdir our trainers restore, with the EMA or the raw weights as asked;
(d) bad inputs stop with one clear message before anything is written.

Why the reference is hand-written rather than diffusers' ``UNet2DModel`` (diffusers 0.42):
UNet2DModel matches the time features (flip_sin_to_cos=False, freq_shift=1), the time MLP,
ResnetBlock2D's order (GN, SiLU, nearest / 2x2-average resampling of both paths, conv, plus
Linear(SiLU(temb)), GN, SiLU, dropout, conv, sum / output_scale_factor=sqrt 2), the middle
block, the attention (single head, residual, rescale sqrt 2) and the skip concatenation order,
but it cannot hold this layout:
  1. ResnetDownsampleBlock2D / ResnetUpsampleBlock2D build their resampling ResnetBlock2D with
     in == out, so it has no 1x1 ``conv_shortcut`` (use_in_shortcut defaults to in != out);
     score_sde's BigGAN block always has ``Conv_2`` when it resamples (modules 7, 16, 21, 34,
     40 and 47 of the published network would have no home).
  2. AttnUpBlock2D attends after every resnet of a level (5 attention blocks at 16x16);
     score_sde attends once, after the last one (module 46). AttnSkipUpBlock2D attends once
     but brings the output pyramid (skip_norm, skip_conv, FIR upsampling; AttnSkipDownBlock2D
     the input pyramid) that progressive='none' / progressive_input='none' do not have.
  3. One ``norm_num_groups`` for every GroupNorm, where score_sde uses min(C / 4, 32): equal
     from 128 channels up, different for narrow test networks (16 channels: 4 groups).
"""

import hashlib
import json
import os
import subprocess
import sys
import types
from unittest import mock

import jax
import numpy as np
import pytest
import torch

from configs import cifar10_fgm
from configs import cifar10_teacher
from fgm_jax import checkpoint
from fgm_jax import checkpoint_compat
from fgm_jax import config_checks
from fgm_jax import sharding as sharding_lib
from fgm_jax.convert import common
from fgm_jax.convert import rectified_flow
from fgm_jax.convert import rectified_flow_keys
from fgm_jax.models import unet
from fgm_jax.train import run_dir
from fgm_jax.train import trainers
from tests import helpers
from tests.parity.reference import rf_reference

RNG = np.random.default_rng(0)
X = RNG.normal(size=(3, 32, 32, 3)).astype(np.float32)
T = np.array([0.0, 0.37, 1.0], np.float32)  # labels 999, 629.37, 0


# rf_reference.NARROW in our config: two levels, so down / up blocks and a level with attention.
NARROW_MODEL = unet.rectified_flow_cifar10(model_channels=16, channel_mult=(1, 2), num_blocks=1,
                                           attn_resolutions=(16,))


def _teacher_config():
  c = cifar10_teacher.get_config("rf_teacher,runlocal")
  c.model = NARROW_MODEL
  return c


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """One random narrow checkpoint, converted with the EMA (in-process) and with the raw
  weights (on the command line)."""
  root = tmp_path_factory.mktemp("rf_import")
  ckpt = rf_reference.write_random_checkpoint(str(root / "checkpoint_8.pth"),
                                              **rf_reference.NARROW)
  out = {"ckpt": ckpt, "root": root, "ema": str(root / "teacher_ema"), "ema_log": [],
         "model": str(root / "teacher_model")}
  rectified_flow.convert(ckpt.path, out["ema"], _teacher_config(), weights="ema",
                         log=out["ema_log"].append)
  out["cli"] = subprocess.run(
      [sys.executable, "-m", "fgm_jax.convert.rectified_flow", ckpt.path, out["model"],
       "--weights=model", "--config=configs/cifar10_teacher.py:rf_teacher,runlocal"],
      cwd=helpers.ROOT, capture_output=True, text=True, timeout=300)
  return out


@pytest.fixture(scope="module")
def restored(converted):
  """Host copies of the teacher weights as our code restores them: the EMA import the way
  job=sample / job=evaluate restore a run, the raw import the way the distiller does
  (configs/cifar10_fgm.py:rf_teacher,runlocal, teacher.use_ema=True)."""
  assert converted["cli"].returncode == 0, converted["cli"].stderr[-2000:]
  trainer, state = run_dir.restore_latest(_teacher_config(), converted["ema"])
  assert int(state.step) == converted["ckpt"].step
  assert trainer.model.time_scale == 999.0 and trainer.model.time_reverse
  fgm = cifar10_fgm.get_config("rf_teacher,runlocal")
  fgm.teacher.model = NARROW_MODEL
  fgm.teacher.workdir = converted["model"]
  config_checks.validate(fgm)  # job=train: the teacher checkpoint exists and fits
  distiller = trainers.FGMTrainer(fgm, sharding_lib.mesh_from_config(fgm.mesh))
  return {"ema": jax.device_get(trainer.teacher_params(state)),
          "model": jax.device_get(distiller.frozen_teacher)}


def _rel_errors(got, want):
  return (float(np.linalg.norm(got - want) / np.linalg.norm(want)),
          float(np.max(np.abs(got - want)) / np.max(np.abs(want))))


# --- (a) keys ---------------------------------------------------------------------------------


def test_key_list_of_the_published_network_matches_the_reference():
  with torch.device("meta"):  # shapes only: nothing allocated
    ref = rf_reference.NCSNpp(**rf_reference.PUBLISHED)
  ref_keys = rf_reference.key_shapes(ref)
  assert list(ref_keys)[0] == "sigmas" and rf_reference.param_count(ref) == 61_804_419
  ours = rectified_flow_keys.key_shapes(unet.rectified_flow_cifar10(), 32, 3)
  # Same keys, shapes and order (the order pairs the EMA list with names), minus the buffer.
  assert list(ours.items()) == [(k, s) for k, s in ref_keys.items() if k != "sigmas"]
  assert len(ours) == 564 and sum(int(np.prod(s)) for s in ours.values()) == 61_804_419
  assert len(ref.all_modules) == 55
  # The architecture is read back off the keys alone.
  assert rectified_flow_keys.infer_architecture(ours, 32) == dict(
      model_channels=128, channel_mult=(1, 2, 2, 2), num_blocks=4, attn_resolutions=(16,))


# --- (b) numerics -----------------------------------------------------------------------------


def test_velocity_matches_reference_for_ema_and_raw_weights(converted, restored):
  module = unet.from_config(NARROW_MODEL)
  apply = jax.jit(lambda params, x, t: module.apply({"params": params}, x, t))
  ckpt = converted["ckpt"]
  got = {w: np.asarray(apply(params, X, T)) for w, params in restored.items()}
  for weights, reference in (("ema", ckpt.ema_model), ("model", ckpt.model)):
    l2, peak = _rel_errors(got[weights], rf_reference.velocity(reference, X, T))
    print(f"{weights}: relative error L2 {l2:.2e}, max {peak:.2e}")
    assert l2 < 1e-5 and peak < 1e-5, (weights, l2, peak)
  # The EMA and the raw weights are independent draws: the choice matters.
  assert _rel_errors(got["ema"], got["model"])[0] > 0.1


# --- (c) files and workdirs -------------------------------------------------------------------


def _named(model):
  return {k: p.detach().numpy() for k, p in model.named_parameters()}


def test_chosen_tensors_land_where_our_code_reads_them(converted, restored):
  ckpt = converted["ckpt"]
  last = len(ckpt.model.all_modules) - 1
  attn = [m.index for m in rectified_flow_keys.module_plan(NARROW_MODEL, 32, 3)
          if m.kind == "attention"][-1]
  for weights, reference in (("ema", ckpt.ema_model), ("model", ckpt.model)):
    params, src = restored[weights], _named(reference)
    # Placed by hand: the output conv (OIHW -> HWIO), the time MLP (transposed) and the
    # decoder attention's q / k / v (interleaved into qkv, channel 3 c + j).
    np.testing.assert_array_equal(params["dec_32x32_aux_conv"]["kernel"],
                                  src[f"all_modules.{last}.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["map_layer0"]["kernel"], src["all_modules.0.weight"].T)
    qkv = params["dec_16x16_block1"]["qkv"]
    for j in range(3):
      np.testing.assert_array_equal(qkv["kernel"][0, 0, :, j::3],
                                    src[f"all_modules.{attn}.NIN_{j}.W"])
      np.testing.assert_array_equal(qkv["bias"][j::3], src[f"all_modules.{attn}.NIN_{j}.b"])


def test_workdir_records_config_and_provenance(converted):
  ckpt, workdir = converted["ckpt"], converted["ema"]
  # config.json as run_dir.prepare_workdir writes it.
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  want = json.loads(json.dumps(checkpoint_compat.fingerprint(_teacher_config())))
  assert saved["fingerprint"] == want
  with open(os.path.join(workdir, rectified_flow.PROVENANCE_NAME)) as f:
    prov = json.load(f)
  with open(ckpt.path, "rb") as f:
    assert prov["sha256"] == hashlib.sha256(f.read()).hexdigest()
  assert (prov["weights"], prov["step"], prov["parameters"]) == (
      "ema", ckpt.step, rf_reference.param_count(ckpt.model))
  assert prov["dropped"] == {"sigmas": "float64[1000]"}
  meta = checkpoint.read_meta(checkpoint.checkpoint_dir(workdir))
  assert meta["job"] == "train" and meta["imported_from"]["sha256"] == prov["sha256"]
  logs = "\n".join(converted["ema_log"])
  assert "EMA (what RectifiedFlow samples with" in logs and "189,347 parameters" in logs


def test_command_line(converted, tmp_path, capsys):
  cli = converted["cli"]
  assert "raw model weights" in cli.stdout and "wrote " in cli.stdout, cli.stdout
  with open(os.path.join(converted["model"], rectified_flow.PROVENANCE_NAME)) as f:
    assert json.load(f)["weights"] == "model"
  # The command's error path, in-process: a second import into the same folder.
  flags = types.SimpleNamespace(config=_teacher_config(), weights="ema")
  with mock.patch.object(rectified_flow, "_FLAGS", flags), pytest.raises(SystemExit) as e:
    rectified_flow._main(["prog", converted["ckpt"].path, converted["model"]])
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and len(err.splitlines()) == 1, err
  assert err.startswith("error: ") and "already holds a checkpoint" in err


# --- (d) bad inputs ---------------------------------------------------------------------------


def _convert(path, workdir, weights="ema"):
  return rectified_flow.convert(path, workdir, _teacher_config(), weights=weights,
                                log=lambda _: None)


def test_bad_inputs_stop_with_one_clear_message(converted, tmp_path):
  import argparse
  good = torch.load(converted["ckpt"].path, weights_only=True)
  out = str(tmp_path / "out")

  # A file that needs unpickling (here: an argparse.Namespace, as some training scripts save).
  pickled = str(tmp_path / "pickled.pth")
  torch.save(dict(good, args=argparse.Namespace(lr=2e-4)), pickled)
  with pytest.raises(common.ConversionError,
                     match=r"weights_only=True\) refuses \(GLOBAL argparse.Namespace\)"):
    _convert(pickled, out)

  # Another architecture: a 1-channel network, and one with a foreign block layout.
  gray = rf_reference.write_random_checkpoint(str(tmp_path / "gray.pth"), channels=1,
                                              with_optimizer=False, **rf_reference.NARROW)
  with pytest.raises(common.ConversionError) as e:
    _convert(gray.path, out)
  msg = str(e.value)
  assert "0 missing, 0 unexpected, 3 mis-shaped" in msg  # input conv, output conv
  assert "all_modules.2.weight: expected (16, 3, 3, 3), got (16, 1, 3, 3)" in msg
  foreign = dict(good)
  foreign["model"] = {k.replace(".Conv_2.", ".NIN_0."): v for k, v in good["model"].items()}
  foreign_path = str(tmp_path / "foreign.pth")
  torch.save(foreign, foreign_path)
  with pytest.raises(common.ConversionError) as e:
    _convert(foreign_path, out, weights="model")
  msg = str(e.value)
  assert "missing     all_modules.4.Conv_2.weight" in msg
  assert "unexpected  all_modules.4.NIN_0" in msg
  assert len(msg.splitlines()) < 25  # the first problems, not hundreds of lines

  # An EMA that does not pair with the model by order.
  short = dict(good, ema=dict(good["ema"], shadow_params=good["ema"]["shadow_params"][1:]))
  short_path = str(tmp_path / "short_ema.pth")
  torch.save(short, short_path)
  with pytest.raises(common.ConversionError, match="153 shadow tensors but the model has 154"):
    _convert(short_path, out)

  with pytest.raises(FileNotFoundError, match="does not exist.*checkpoint_8.pth"):
    _convert(str(tmp_path / "missing.pth"), out)
  assert not os.path.exists(out)  # nothing was written by any of them


def test_rf_configs():
  teacher = cifar10_teacher.get_config("rf_teacher")
  assert teacher.model.to_dict() == unet.rectified_flow_cifar10().to_dict()
  assert teacher.flow.t_max == 0.999 and teacher.optim.ema_decay == 0.999999
  for variant in ("rf_teacher", "rf_teacher,runlocal"):
    config_checks.validate(cifar10_teacher.get_config(variant))
    fgm = cifar10_fgm.get_config(variant)
    assert fgm.teacher.model.to_dict() == cifar10_teacher.get_config(variant).model.to_dict()
    # RectifiedFlow never trained at s = 1 - t < 1e-3: FGM stays inside t <= 0.999.
    assert fgm.fgm.t_max <= 0.999 and fgm.fgm.t_star <= 0.999
  # The ':rf_teacher,runlocal' network is rf_reference.RUNLOCAL, and a checkpoint of it
  # converts into exactly that config (one level: no down block ends the level's run).
  with torch.device("meta"):
    runlocal = rf_reference.NCSNpp(**rf_reference.RUNLOCAL)
  shapes = {k: s for k, s in rf_reference.key_shapes(runlocal).items() if k != "sigmas"}
  inferred = rectified_flow_keys.infer_architecture(shapes, 32)
  model = cifar10_teacher.rf_narrow_model()
  assert inferred == {k: model[k] for k in inferred}


def test_realuid_recipe_builds_over_the_imported_teacher_on_mock_cifar10(converted, tmp_path):
  """configs/cifar10_fgm.py:rf_teacher,realuid,runlocal: RealUID's recipe (the reference's
  alpha/beta, 5 online updates, online flow from random init) over the imported teacher, tfds
  CIFAR-10 (mocked) as the real stream: the trainer reads a real batch per online update and
  its FGM step traces and lowers. (Compiling five online updates of this U-Net takes minutes on
  2 cores; the real-data step's numerics are test_realuid's.)"""
  tfds = pytest.importorskip("tensorflow_datasets")
  c = cifar10_fgm.get_config("rf_teacher,realuid,runlocal")
  r = c.fgm.real_data
  assert (r.enabled, r.alpha, r.beta, c.fgm.alpha, c.fgm.online_steps) == (True, 0.92, 0.94,
                                                                          0.5, 5)
  assert c.fgm.init_online == "random" and c.teacher.data.tfds_name == "cifar10"
  assert (c.optim.ema_decay, tuple(c.optim.extra_ema_decays)) == (0.999, (0.9996, 0.9999))
  c.teacher.model = NARROW_MODEL
  c.teacher.workdir = converted["model"]
  config_checks.validate(c)
  mesh = sharding_lib.mesh_from_config(c.mesh)
  with tfds.testing.mock_data(num_examples=64):
    c = trainers.prepare(c, str(tmp_path))
    trainer = trainers.build(c, mesh)
    real = [np.asarray(jax.device_get(trainer._real_batch(step))) for step in (0, 1)]
    jitted, args = trainer.compile_targets(c.batch_size)["train_step"]
    lowered = jitted.lower(*args)
  rows = c.batch_size * c.fgm.online_steps  # one batch of real images per online update
  assert real[0].shape == (rows, 32, 32, 3) and real[0].dtype == np.float32
  assert real[0].min() >= -1 and real[0].max() <= 1 and real[0].std() > 0.1
  assert not np.array_equal(real[0], real[1])  # the stream moves with the step
  assert "stablehlo" in lowered.as_text()[:100000]