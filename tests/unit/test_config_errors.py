"""Bad input stops before any compilation, with one message naming the field and the fix."""

import subprocess
import sys

import jax
import pytest

from fgm_jax import checkpoint_compat
from fgm_jax import config_checks
from fgm_jax import main as main_lib
from fgm_jax.train import loop
from tests import helpers


@pytest.fixture
def no_compile(monkeypatch):
  """Any jax.jit call fails the test: errors must come before compilation."""

  def refuse(*args, **kwargs):
    raise AssertionError("jax.jit was called before the config error was raised")

  monkeypatch.setattr(jax, "jit", refuse)


def _expect(config, workdir, *fragments):
  with pytest.raises(config_checks.ConfigError) as err:
    main_lib.run(config, str(workdir))
  for fragment in fragments:
    assert fragment in str(err.value), str(err.value)
  return str(err.value)


def test_negative_learning_rate(tmp_path, no_compile):
  c = helpers.tiny_teacher_config()
  c.optim.lr = -1e-3
  _expect(c, tmp_path, "config.optim.lr=-0.001", "must be > 0", "--config.optim.lr=")


def test_bad_decay_steps_are_refused(tmp_path, no_compile):
  c = helpers.tiny_teacher_config()
  c.optim.warmup_steps = 10
  c.optim.decay_steps = (5, 20)
  _expect(c, tmp_path, "config.optim.decay_steps=(5, 20)", "warmup_steps=10 <= start < end",
          "--config.optim.decay_steps=")
  c.optim.decay_steps = ()
  c.optim.final_lr_scale = 1.5
  _expect(c, tmp_path, "config.optim.final_lr_scale=1.5", "[0, 1]")


def test_online_learning_rate_in_distill(tmp_path, no_compile):
  c = helpers.tiny_fgm_config(str(tmp_path / "teacher"))
  c.online_optim.lr = 0.0
  _expect(c, tmp_path, "config.online_optim.lr=0.0")


def test_batch_not_divisible_by_devices(tmp_path, no_compile):
  c = helpers.tiny_teacher_config()
  c.batch_size = jax.device_count() + 1
  _expect(c, tmp_path, f"config.batch_size={jax.device_count() + 1}", "not divisible",
          f"multiple of {jax.device_count()}")


def test_unknown_dataset(tmp_path, no_compile):
  c = helpers.tiny_teacher_config()
  c.data.name = "imagenet9"
  _expect(c, tmp_path, "config.data.name='imagenet9'", "toy2d")


def test_run_kind_is_declared_and_checked(tmp_path, no_compile):
  """config.trainer decides the kind of run, not which sections a config happens to have."""
  c = helpers.tiny_teacher_config()
  c.trainer = "diffusion"
  _expect(c, tmp_path, "config.trainer='diffusion' is unknown", "'fgm'", "'teacher'")
  c = helpers.tiny_teacher_config()
  c.trainer = "fgm"  # a teacher config declared as a distillation
  _expect(c, tmp_path, "config.trainer='fgm' distils a teacher", "config.teacher",
          "config.fgm", "configs/toy2d_fgm.py")


@pytest.mark.parametrize("old", ["teacher", "distill"])
def test_job_names_from_before_train_are_refused_with_the_new_one(tmp_path, no_compile, old):
  """job=teacher and job=distill became job=train (config.trainer says what trains)."""
  c = helpers.tiny_fgm_config(str(tmp_path / "teacher"))
  c.job = old
  _expect(c, tmp_path, f"config.job={old!r} is now 'train'", "config.trainer (here 'fgm')",
          "--config.job=train")


def test_checkpoints_saved_as_distill_runs_still_match(tmp_path):
  """Fingerprints saved when the FGM run's kind was called 'distill' resume under 'fgm'."""
  c = helpers.tiny_fgm_config(str(tmp_path / "teacher"))
  meta = {"fingerprint": {**checkpoint_compat.fingerprint(c), "kind": "distill"}}
  assert checkpoint_compat.fingerprint(c)["kind"] == "fgm"
  checkpoint_compat.compare_with_saved(c, meta, str(tmp_path))
  meta["fingerprint"]["kind"] = "teacher"
  with pytest.raises(config_checks.ConfigError, match="checkpoint kind"):
    checkpoint_compat.compare_with_saved(c, meta, str(tmp_path))


def test_unknown_toy_distribution(tmp_path, no_compile):
  c = helpers.tiny_teacher_config()
  c.data.distribution = "spiral"
  _expect(c, tmp_path, "config.data.distribution='spiral'", "checkerboard")


def test_unknown_model(tmp_path, no_compile):
  c = helpers.tiny_teacher_config()
  c.model.name = "resnet"
  _expect(c, tmp_path, "config.model.name='resnet'", "mlp")


def test_distill_without_teacher_checkpoint(tmp_path, no_compile):
  c = helpers.tiny_fgm_config(str(tmp_path / "no_teacher_here"))
  message = _expect(c, tmp_path, "config.teacher.workdir=", "no teacher checkpoint",
                    "Train the teacher first")
  assert "rectified_flow" not in message  # no published teacher to import for toy data


def test_cifar10_distill_without_teacher_names_the_published_one(tmp_path, no_compile):
  """configs/cifar10_fgm.py's usage line without a teacher: both ways in, in one line."""
  from configs import cifar10_fgm
  c = cifar10_fgm.get_config()
  c.teacher.workdir = str(tmp_path / "cifar10_teacher")
  message = _expect(c, tmp_path / "run", "no teacher checkpoint", "Train the teacher first",
                    "python -m fgm_jax.convert.rectified_flow checkpoint_8.pth",
                    "--config=configs/cifar10_fgm.py:rf_teacher")
  assert "\n" not in message


def test_unknown_fgm_weighting(tmp_path, no_compile):
  c = helpers.tiny_fgm_config(str(tmp_path))
  c.fgm.weighting = "snr"
  _expect(c, tmp_path, "config.fgm.weighting='snr'", "sid_norm")


@pytest.mark.parametrize("field, value, fragment", [
    ("guidance", 0.5, "config.fgm.guidance=0.5 must be >= 1"),
    ("teacher_dtype", "float16", "config.fgm.teacher_dtype='float16': choose 'float32'")])
def test_fgm_settings_every_kind_reads(tmp_path, no_compile, field, value, fragment):
  """Checked for every FGM run (fgm.check_config), not only SD3's: the generic trainer reads
  them too."""
  c = helpers.tiny_fgm_config(str(tmp_path))
  c.fgm[field] = value
  _expect(c, tmp_path, fragment)


def test_mesh_that_does_not_fit_the_devices(tmp_path, no_compile):
  c = helpers.tiny_teacher_config()
  c.mesh.fsdp = 3
  _expect(c, tmp_path, "config.mesh", "fsdp * tensor = 3", f"{jax.device_count()} devices")
  c.mesh.fsdp = 0
  _expect(c, tmp_path, "config.mesh.fsdp=0 must be >= 1")


def test_mesh_rules_name_mesh_axes(tmp_path, no_compile):
  c = helpers.tiny_teacher_config()
  c.mesh.rules = (("embed", "model"),)
  _expect(c, tmp_path, "config.mesh.rules entry ('embed', 'model')", "'fsdp'")


def test_workdir_from_incompatible_config(tmp_path, monkeypatch):
  c = helpers.tiny_teacher_config(num_steps=2, every=1)
  loop.train(c, str(tmp_path), write_metrics=False, progress=False)
  c.model.hidden = 16
  with monkeypatch.context() as m:
    m.setattr(jax, "jit", lambda *a, **k: (_ for _ in ()).throw(AssertionError("compiled")))
    msg = _expect(c, tmp_path, "incompatible config", "config.model.hidden",
                  "checkpoint has 32, this config has 16", "new --workdir")
  assert "config.json" in msg


def test_compute_only_fields_do_not_make_a_checkpoint_incompatible(tmp_path):
  """A float32 teacher distils in bfloat16 (or with remat, or from another data folder);
  a changed width is still refused. Old fingerprints that hold those fields still match."""
  from configs import cifar10_fgm
  saved = cifar10_fgm.get_config("rf_teacher")
  meta = {"fingerprint": {**checkpoint_compat.fingerprint(saved),
                          "model": saved.teacher.model.to_dict()}}  # as older runs saved it
  c = cifar10_fgm.get_config("rf_teacher")
  c.teacher.model.dtype, c.teacher.model.remat = "bfloat16", True
  c.teacher.data.data_dir = "/elsewhere"
  checkpoint_compat.compare_with_saved(c, meta, str(tmp_path))
  c.teacher.model.model_channels = 64
  with pytest.raises(config_checks.ConfigError, match="config.teacher.model.model_channels"):
    checkpoint_compat.compare_with_saved(c, meta, str(tmp_path))


def test_command_line_prints_one_clear_line(tmp_path):
  """Through the CLI: exit code 2, the message on stderr, no traceback."""
  proc = subprocess.run(
      [sys.executable, "-m", "fgm_jax.main", "--config=configs/toy2d_teacher.py",
       f"--workdir={tmp_path}", "--config.optim.lr=-1.0"],
      cwd=helpers.ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert "error: config.optim.lr=-1.0 must be > 0" in proc.stderr
  assert "Traceback" not in proc.stderr


def _sd3_compile_config(**aot):
  from configs import sd3_fgm
  c = sd3_fgm.get_config()
  c.job = "compile"
  c.aot.update(aot)
  return c


@pytest.mark.parametrize("change,fragments", [
    (dict(), ("config.job='compile' needs the MM-DiT's shape", "sd3-medium")),
    (dict(architecture="sd3-large"), ("config.aot.architecture='sd3-large' is unknown",)),
    (dict(architecture="sd3-medium", sample_batch=3), ("config.aot.sample_batch=3",)),
])
def test_compile_job_inputs(tmp_path, no_compile, change, fragments):
  """job=compile: what it cannot compile from is named before anything is traced."""
  _expect(_sd3_compile_config(**change), tmp_path, *fragments)


def test_compile_job_unknown_function(tmp_path):
  # Named once the run's functions are known (the trainer is built), before any compile.
  _expect(_sd3_compile_config(architecture="sd3-medium", functions=("train_stp",)), tmp_path,
          "config.aot.functions names ['train_stp']", "'train_step', 'generator'")
