"""SD3 FGM with low-rank adapters (config.lora) on the tiny random SD3 folder (fp32).

Step 0 is the teacher (generator and online flow, scanned and unrolled); LoRA iterations run
with finite losses and move only the adapters (the checkpoint holds no base weights); 8
devices = 1 device; a SIGKILLed run resumes exactly; the export's merged folder in
StableDiffusion3Pipeline (1 step, no CFG) and the LoRA file loaded with load_lora_weights onto
the teacher's pipeline (in the environment `pip install ".[diffusers]"` gives) both equal our
one-step sampler; job=export and job=sample ask the checkpoint for the generator's adapters
alone (issue 25, item 3; that such a partial restore reads only those bytes is
tests/integration/test_generator_restore.py's: these trees are too small for orbax's
metadata not to dominate a byte count); bad inputs stop with one line before compiling.
"""

import json
import os
import shutil
import sys
import time

import jax
import numpy as np
import pytest
from flax import traverse_util

from fgm_jax import main as main_lib
from fgm_jax import sharding as sharding_lib
from fgm_jax.convert import common as convert_common
from fgm_jax.convert import diffusers as dconv
from fgm_jax.convert import sd3_lora
from fgm_jax.models import lora
from fgm_jax.sd3 import one_step
from fgm_jax.train import loop
from fgm_jax.train import steps
from fgm_jax.train import trainers
from tests import extra_env
from tests import helpers
from tests import xla_flags
from tests.integration.test_sd3_fgm import (  # noqa: F401  (module fixtures, reused)
    OneStepCase, T5_LENGTH, _compile_once, _state, fgm_config, inputs)
from tests.parity.reference import sd3_reference as ref

torch = pytest.importorskip("torch")
STEPS, EVERY = 6, 2
TARGETS = ("attention", "mlp", "adaln")


def lora_config(inputs, **overrides):
  fields = {"lora.rank": 8, "lora.alpha": 16.0, "lora.targets": TARGETS,
            "optim.lr": 1e-3, "online_optim.lr": 1e-3}
  return fgm_config(inputs, **{**fields, **overrides})


@pytest.fixture(scope="module")
def trained(inputs, tmp_path_factory):
  """An uninterrupted STEPS-iteration LoRA run on the 8-device mesh (in this process)."""
  workdir = str(tmp_path_factory.mktemp("lora_a"))
  config = lora_config(inputs, num_steps=STEPS, **{"checkpoint.every": EVERY,
                                                   "checkpoint.keep": STEPS // EVERY})
  main_lib.run(config, workdir)
  return config, workdir


@pytest.fixture(scope="module")
def fresh(inputs, tmp_path_factory):
  """(trainer, its initial state) of a LoRA run (scanned MM-DiT)."""
  trainer = _trainer(lora_config(inputs), str(tmp_path_factory.mktemp("lora_fresh")))
  return trainer, trainer.init_state()


def _trainer(config, workdir, mesh=None):
  config = trainers.prepare(config, workdir)
  return trainers.build(config, mesh or sharding_lib.mesh_from_config(config.mesh))


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree))


def test_step_zero_generator_and_online_flow_are_the_teacher(fresh):
  """(scanned; the unrolled MM-DiT takes adapters alike: tests/unit/test_lora.py)"""
  trainer, state = fresh
  teacher = trainer.frozen_teacher
  # Only adapters are trained (and have optimizer states): no kernel, bias or table.
  assert {p[-1] for p in _flat(state.gen_params)} == {lora.A, lora.B}
  opt_keys = {getattr(k, "key", None) for path, _ in jax.tree_util.tree_leaves_with_path(
      state.gen_opt_state) for k in path}
  assert lora.A in opt_keys and not opt_keys & {"kernel", "bias", "scale", "pos_embed"}
  rng = np.random.default_rng(0)
  x = rng.standard_normal((8,) + trainer.shape).astype(np.float32)
  t = np.linspace(0.05, 1.0, 8).astype(np.float32)
  cond = trainer.cond_source.batch(0, 8)
  want = steps.velocity_fn(trainer.model, teacher, cond=cond)(x, t)
  for net in (state.gen_params, state.online_params):
    got = steps.velocity_fn(trainer.model, trainer._compose(net, teacher), cond=cond)(x, t)
    np.testing.assert_array_equal(got, want)
  for a, b in zip(jax.tree.leaves(trainer.network_weights(state.gen_params)),
                  jax.tree.leaves(teacher)):
    np.testing.assert_array_equal(a, b)


def test_lora_iterations_move_only_the_adapters(trained, fresh):
  config, workdir = trained
  step, state = _state(config, workdir)
  assert step == STEPS
  start = fresh[1]
  for name in ("gen_params", "online_params"):
    now, then = _flat(getattr(state, name)), _flat(getattr(start, name))
    assert set(now) == set(then) and {p[-1] for p in now} == {lora.A, lora.B}
    assert all(np.all(np.isfinite(v)) for v in now.values())
    moved = max(float(np.max(np.abs(now[p] - then[p]))) for p in now if p[-1] == lora.B)
    assert moved > 1e-4, name  # B left zero: the adapters trained
  # (the run's losses were finite at every step: the loop stops on a non-finite one)


def test_lora_step_on_one_device_equals_eight(inputs, trained, tmp_path):
  config, workdir = trained
  one = sharding_lib.make_mesh(devices=jax.devices()[:1])
  short = config.copy_and_resolve_references()
  short.num_steps = EVERY
  loop.train(short, str(tmp_path / "one"), mesh=one, write_metrics=False, progress=False)
  (_, a), (_, b) = _state(short, str(tmp_path / "one"), one), _state(config, workdir,
                                                                     step=EVERY)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=2e-5)


def test_sigkilled_lora_run_resumes_exactly(inputs, trained, tmp_path_factory):
  config, workdir_a = trained
  workdir = str(tmp_path_factory.mktemp("lora_b"))
  cmd = [sys.executable, "-m", "fgm_jax.main", "--config=configs/sd3_fgm.py:runlocal",
         f"--workdir={workdir}", *helpers.overrides(config),
         f"--config.lora.targets={TARGETS!r}"]
  env = dict(os.environ, XLA_FLAGS=xla_flags.for_devices(8), PYTHONPATH=helpers.ROOT,
             **helpers.compilation_cache_env(helpers.worker_cache_dir(tmp_path_factory)))
  ckpt_dir = os.path.join(workdir, "checkpoints")
  helpers.run_and_kill(cmd, env, helpers.checkpointed(ckpt_dir), timeout=600)
  killed_at = max(helpers.complete_steps(ckpt_dir))
  assert EVERY <= killed_at < STEPS
  loop.train(config, workdir, write_metrics=False, progress=False)
  (step_a, a), (step_b, b) = _state(config, workdir_a), _state(config, workdir)
  assert step_a == step_b == STEPS
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)


def _checkpoint_reads(monkeypatch):
  """Records what job=sample/export ask the checkpoint for: the branches of a partial
  restore, or a whole state."""
  from fgm_jax import checkpoint
  calls = []
  branches = checkpoint.read_branches
  monkeypatch.setattr(checkpoint, "read_branches", lambda directory, step, target: (
      calls.append(sorted(target)) or branches(directory, step, target)))
  for name in ("restore", "read"):
    whole = getattr(checkpoint, name)
    monkeypatch.setattr(checkpoint, name, lambda *a, whole=whole, **k: (
        calls.append("whole state") or whole(*a, **k)))
  return calls


def test_merged_export_and_lora_file_in_diffusers_equal_our_one_step_sampler(
    inputs, trained, tmp_path, monkeypatch):
  folder, _, _ = inputs
  config, workdir = trained
  export = config.copy_and_resolve_references()
  export.job, export.export.output = "export", str(tmp_path / "merged")
  export.export.lora_output = str(tmp_path / "lora")
  reads = _checkpoint_reads(monkeypatch)
  main_lib.run(export, workdir)
  assert reads == [["gen_params"]]  # not the online flow, the Adam moments or the teacher
  lora_file = tmp_path / "lora" / sd3_lora.WEIGHT_NAME
  note = json.loads((tmp_path / "merged" / "fgm_jax.json").read_text())
  assert note["lora"]["rank"] == 8 and note["lora"]["file"] == str(lora_file)

  _, _, _, adapters, _ = one_step.restore_generator(config, workdir)
  trainer = _trainer(config, workdir)
  gen = one_step.generator_weights(trainer, adapters)  # what job=sample samples with
  _, exported = dconv.load_params(str(tmp_path / "merged" / "transformer"), "mmdit")
  from_file = sd3_lora.load_merged(str(lora_file), os.path.join(folder, "transformer"))
  for a, b, c in zip(jax.tree.leaves(exported), jax.tree.leaves(gen),
                     jax.tree.leaves(from_file)):
    np.testing.assert_array_equal(a, b)  # fp32 export: the merged weights
    np.testing.assert_allclose(c, b, rtol=0, atol=1e-6)  # the file, merged by us

  case = OneStepCase(folder)
  prompts, noise = case.prompts, case.noise
  latents, images = case.ours(gen)
  want_latents = case.diffusers(tmp_path / "merged")
  assert ref.max_rel_err(latents, want_latents) <= 1e-4
  teacher_latents, _ = case.ours(case.sd3.mmdit_params)
  assert ref.max_rel_err(teacher_latents, want_latents) > 1e-3  # the adapters' effect shows
  # The LoRA file onto the teacher's own folder, where users load it: `pip install
  # ".[diffusers]"` (peft included), outside pytest.
  python, versions = extra_env.build(str(tmp_path / "venv"), "diffusers")
  assert "peft" in versions
  got_latents, got_images, _ = extra_env.sd3_one_step(
      python, folder, prompts, noise, str(tmp_path), lora=str(lora_file), height=16,
      width=16, max_sequence_length=T5_LENGTH)
  assert ref.max_rel_err(latents, got_latents) <= 1e-4
  assert ref.max_rel_err(images, got_images) <= 1e-4

  sample = config.copy_and_resolve_references()
  sample.job, sample.sample.num = "sample", 2
  reads.clear()
  main_lib.run(sample, workdir)
  assert reads == [["gen_params"]]
  assert sorted(os.listdir(os.path.join(workdir, "images"))) == [
      "00000_seed0.png", "00001_seed0.png"]


def _fails(config, run_dir, *needles):
  start = time.time()
  status, message = main_lib.run_with_status(config, str(run_dir))
  assert status == 2, message
  assert "\n" not in message and all(n in message for n in needles), message
  assert time.time() - start < 20  # no FGM step was compiled (that takes longer here)


def test_bad_lora_inputs_stop_with_one_line(inputs, trained, tmp_path):
  folder, _, _ = inputs
  config, workdir = trained
  _fails(lora_config(inputs, **{"lora.rank": 17}), tmp_path / "big",
         "config.lora.rank=17 exceeds the projection", "rank <= 16")
  assert not os.path.isdir(tmp_path / "big" / "checkpoints")
  _fails(lora_config(inputs, **{"lora.targets": ("attention", "conv")}), tmp_path / "targets",
         "config.lora.targets=('attention', 'conv')")
  # A LoRA run's checkpoint is not a full fine-tuning one (and the other way round).
  full = config.copy_and_resolve_references()
  full.lora.rank = 0
  _fails(full, workdir, "incompatible config")
  # A LoRA file for another base: a folder whose MM-DiT has other widths.
  other = tmp_path / "other"
  shutil.copytree(os.path.join(folder, "transformer"), other)
  config_json = json.loads((other / "config.json").read_text())
  config_json.update(num_attention_heads=4, caption_projection_dim=32)
  (other / "config.json").write_text(json.dumps(config_json))
  state = sd3_lora.state_from_adapters(
      jax.device_get(_state(config, workdir)[1].gen_params),
      _trainer(config, str(tmp_path / "t")).model, 1.0)
  lora_file = sd3_lora.save(str(tmp_path / "lora_file"), state)
  with pytest.raises(convert_common.ConversionError) as e:
    sd3_lora.read_checked(lora_file, str(other))
  assert "\n" not in str(e.value) and "a LoRA for another base" in str(e.value)
