"""The one-step generator on its own: sampling without the teacher, export -> load with
bit-identical samples, one writer per workdir, and meshes that do or do not fit the devices."""

import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import fgm_jax
from fgm_jax import config_checks
from fgm_jax import main as main_lib
from fgm_jax import sharding as sharding_lib
from fgm_jax import workdir_lock
from fgm_jax.train import loop
from fgm_jax.train import run_dir
from tests import helpers
from tests import xla_flags

N = 512


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A tiny teacher and its FGM run; the teacher is then moved away from where the FGM
  config says it is, as happens when a teacher run is archived or deleted."""
  root = tmp_path_factory.mktemp("artifact")
  teacher_dir, fgm_dir = str(root / "teacher"), str(root / "fgm")
  loop.train(helpers.tiny_teacher_config(num_steps=20, every=20), teacher_dir,
             write_metrics=False, progress=False)
  config = helpers.tiny_fgm_config(teacher_dir, num_steps=10, every=10)
  loop.train(config, fgm_dir, write_metrics=False, progress=False)
  shutil.move(teacher_dir, str(root / "archived_teacher"))
  return config, fgm_dir


def _with(config, **fields):
  c = config.copy_and_resolve_references()
  for key, value in fields.items():
    section, _, name = key.rpartition(".")
    setattr(c[section] if section else c, name, value)
  return c


def test_sample_needs_no_teacher(runs, capsys):
  config, fgm_dir = runs
  main_lib.run(_with(config, job="sample", **{"sample.num": N}), fgm_dir)
  x = np.load(os.path.join(fgm_dir, "samples.npz"))["x"]
  assert x.shape == (N, 2) and np.all(np.isfinite(x))
  assert "FGM 1-step" in capsys.readouterr().out
  # Jobs that do use the teacher still ask for it.
  with pytest.raises(config_checks.ConfigError, match="no teacher checkpoint"):
    main_lib.run(_with(config, job="evaluate"), fgm_dir)


def test_export_then_load_gives_the_runs_samples_bit_for_bit(runs):
  config, fgm_dir = runs
  out = main_lib.run(_with(config, job="export"), fgm_dir)
  assert sorted(os.listdir(out)) == ["README.md", "generator.json", "generator.safetensors"]
  meta = json.loads(open(os.path.join(out, "generator.json")).read())
  assert meta["step"] == config.num_steps and meta["weights"] == "ema"
  assert meta["ema_decay"] == config.optim.ema_decay and meta["example_shape"] == [2]
  assert meta["model"]["name"] == "mlp" and meta["t_star"] == config.fgm.t_star

  gen = fgm_jax.load_generator(out)
  trainer, state = run_dir.restore_latest(config, fgm_dir)
  want = trainer.samples(state, N, seed=3).x
  np.testing.assert_array_equal(gen.sample(N, seed=3), want)
  assert gen.shape == (2,)
  # EMA weights by default: the raw generator differs.
  raw = main_lib.run(_with(config, job="export", **{"export.weights": "raw",
                                                    "export.output": out + "_raw"}), fgm_dir)
  assert not np.array_equal(fgm_jax.load_generator(raw).sample(N, seed=3), want)

  # job=sample reads an artifact folder as well as a run directory, with the same result.
  main_lib.run(_with(config, job="sample", **{"sample.num": N}), fgm_dir)
  main_lib.run(_with(config, job="sample", **{"sample.num": N}), out)
  np.testing.assert_array_equal(np.load(os.path.join(out, "samples.npz"))["x"],
                                np.load(os.path.join(fgm_dir, "samples.npz"))["x"])


def test_load_generator_rejects_a_run_directory(runs):
  _, fgm_dir = runs
  with pytest.raises(FileNotFoundError, match="not an exported generator"):
    fgm_jax.load_generator(fgm_dir)


def test_export_of_a_teacher_config_says_what_it_needs(tmp_path):
  c = helpers.tiny_teacher_config()
  c.job = "export"
  with pytest.raises(config_checks.ConfigError, match="needs a distillation config"):
    main_lib.run(c, str(tmp_path))


# --- one writer per workdir ------------------------------------------------------------------


def _cli(workdir, *extra, devices=8):
  env = dict(os.environ, PYTHONPATH=helpers.ROOT,
             XLA_FLAGS=xla_flags.for_devices(devices))
  return subprocess.run([sys.executable, "-m", "fgm_jax.main",
                         "--config=configs/toy2d_teacher.py", f"--workdir={workdir}",
                         "--config.num_steps=2", *extra],
                        cwd=helpers.ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_second_writer_is_refused_and_a_stale_lock_taken_over(tmp_path, caplog):
  workdir = str(tmp_path / "run")
  path = workdir_lock.acquire(workdir)  # this test process is the live holder
  try:
    proc = _cli(workdir)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"pid {os.getpid()}" in proc.stderr and "in use by" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.isdir(os.path.join(workdir, "checkpoints"))
  finally:
    workdir_lock.release(path)
  assert not os.path.exists(path)

  # A lock left by a process that is gone (SIGKILL, crash) is taken over with a warning
  # (in this process: the refusal above already went through the command line).
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  with open(path, "w") as f:
    json.dump({"host": os.uname().nodename, "pid": gone.pid, "started": 0}, f)
  with caplog.at_level(logging.WARNING):
    loop.train(helpers.tiny_teacher_config(num_steps=2, every=2), workdir,
               write_metrics=False, progress=False)
  assert "stale lock" in caplog.text
  assert os.path.isdir(os.path.join(workdir, "checkpoints"))
  assert not os.path.exists(path)  # released at the end of the run


def test_mesh_larger_than_the_machine_is_one_line(tmp_path):
  proc = _cli(str(tmp_path / "run"), "--config.mesh.fsdp=2", devices=1)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "error: config.mesh: fsdp * tensor = 2 does not divide the 1 devices" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_run_saved_on_8_devices_with_fsdp_2_resumes_on_1_device(tmp_path):
  """A checkpoint from a (4 data x 2 fsdp) mesh resumes on one device with fsdp=1 and ends
  where the uninterrupted 8-device run ends."""
  config = helpers.tiny_teacher_config(num_steps=20, every=10)
  config.mesh.fsdp = 2
  full, moved = str(tmp_path / "full"), str(tmp_path / "moved")
  _, want = loop.train(config, full, write_metrics=False, progress=False)
  half = config.copy_and_resolve_references()
  half.num_steps = 10
  loop.train(half, moved, write_metrics=False, progress=False)
  one = config.copy_and_resolve_references()
  one.mesh.fsdp = 1
  single = sharding_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  _, got = loop.train(one, moved, mesh=single, write_metrics=False, progress=False)
  assert int(got.step) == 20
  for a, b in zip(jax.tree.leaves(jax.device_get(got)), jax.tree.leaves(jax.device_get(want))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
