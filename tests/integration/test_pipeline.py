"""job=pipeline end to end (toy 2-D), and the clear stops of the CIFAR-10 configs on a machine
without CIFAR-10 or a teacher checkpoint (through the real command line)."""

import json
import os
import re
import subprocess
import sys

import pytest

from fgm_jax import config_checks
from fgm_jax import main as main_lib
from fgm_jax import pipeline
from fgm_jax.evaluation import evaluate as evaluate_lib
from tests import helpers
from tests import xla_flags

from configs import cifar10_fgm
from configs import digits_fgm
from configs import digits_teacher


def _tiny_pipeline_config():
  return helpers.tiny_pipeline_config(teacher_steps=60, teacher_every=30, fgm_steps=20,
                                      num_samples=1000)


def test_toy_pipeline_writes_report_and_picture(tmp_path, capsys):
  config = _tiny_pipeline_config()
  main_lib.run(config, str(tmp_path))  # validation and dispatch, as from the command line
  out = capsys.readouterr().out
  for stage in ("[1/4] teacher", "[2/4] fgm", "[3/4] evaluate", "[4/4] report"):
    assert stage in out
  assert "elapsed" in out

  # Each stage trained in its own folder, to the configured step.
  for sub in ("teacher", "fgm"):
    assert os.path.isdir(tmp_path / sub / "checkpoints")
  results = json.loads((tmp_path / "eval.json").read_text())
  metrics = results["metrics"]
  assert set(metrics) == {"fgm_1step", "teacher_euler_1step", "teacher_euler_4step",
                          "teacher_euler_50step", "real_data"}
  for m in metrics.values():
    assert set(m) == {"energy_distance", "sliced_w2"}
  assert results["fgm_step"] == config.num_steps
  # Real data is closest to itself; one Euler step of the teacher is far off.
  assert metrics["real_data"]["sliced_w2"] < metrics["teacher_euler_1step"]["sliced_w2"]
  assert set(results["wall_time_s"]) == {"teacher", "fgm", "evaluate"}

  report = (tmp_path / "report.md").read_text()
  for row in ("| real data |", "| teacher 1-step euler |", "| teacher 4-step euler |",
              "| teacher 50-step euler |", "| FGM 1-step |"):
    assert re.search(re.escape(row) + r" -?\d+\.\d{4} \| \d+\.\d{4} \|", report), row
  assert "## Wall time" in report and "| total |" in report
  assert "--config.job=pipeline" in report and "![samples](samples.png)" in report
  assert (tmp_path / "samples.png").stat().st_size > 1000

  # A second run resumes both finished stages instead of training again.
  main_lib.run(config, str(tmp_path))
  out = capsys.readouterr().out
  assert "[1/4] teacher: already trained (60 of 60 steps)" in out
  assert "[2/4] fgm: already trained (20 of 20 steps)" in out


def test_stage_configs_nest_the_teacher_under_the_workdir(tmp_path):
  config = _tiny_pipeline_config()
  teacher, fgm = pipeline.stage_configs(config, str(tmp_path))
  assert teacher.job == "train" and fgm.job == "train"
  assert fgm.teacher.workdir == str(tmp_path / "teacher")
  assert teacher.mesh == config.mesh and teacher.model == config.teacher.model
  assert config.job == "pipeline"  # the caller's config is left alone


def test_digits_configs_default_to_the_pipeline_and_still_distil_alone(tmp_path):
  config_checks.validate(digits_teacher.get_config())
  c = digits_fgm.get_config()
  assert c.job == "pipeline" and c.teacher.data.shape == (8, 8, 1)
  # 1,500 samples: comparable with the real-data floor (train 1,500 vs held-out 297).
  assert c.eval.num_samples == 1500
  config_checks.validate(c)  # the pipeline trains its own teacher: none needed yet
  c.job = "train"
  c.teacher.workdir = str(tmp_path / "no_teacher")
  with pytest.raises(config_checks.ConfigError, match="no teacher checkpoint"):
    config_checks.validate(c)


# --- the CIFAR-10 configs on a machine without CIFAR-10 or a teacher -------------------------


def _cli(tmp_path, *args):
  env = dict(os.environ)
  env["PYTHONPATH"] = helpers.ROOT
  # Only the error matters here: unoptimised XLA compiles the tiny U-Net several times faster.
  env["XLA_FLAGS"] = xla_flags.OPTIMISATION
  env["TFDS_DATA_DIR"] = str(tmp_path / "no_tfds_data")
  return subprocess.run([sys.executable, "-m", "fgm_jax.main", *args], cwd=helpers.ROOT,
                        env=env, capture_output=True, text=True, timeout=600)


def _assert_clean_stop(proc):
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  return proc.stderr


def test_cifar10_fgm_without_teacher_says_what_to_do(tmp_path):
  err = _assert_clean_stop(_cli(tmp_path, "--config=configs/cifar10_fgm.py",
                                f"--workdir={tmp_path / 'fgm'}",
                                f"--config.teacher.workdir={tmp_path / 'teacher'}"))
  assert "error: config.teacher.workdir=" in err
  assert "no teacher checkpoint" in err and "Train the teacher first" in err
  assert not (tmp_path / "fgm" / "checkpoints").exists()


def test_cifar10_teacher_without_data_says_how_to_get_it(tmp_path):
  err = _assert_clean_stop(_cli(tmp_path, "--config=configs/cifar10_teacher.py:runlocal",
                                f"--workdir={tmp_path / 'teacher'}",
                                f"--config.data.data_dir={tmp_path / 'no_tfds_data'}"))
  assert "error: tfds dataset 'cifar10'" in err and "is not prepared" in err
  assert "--config.data.data_dir" in err and "--config.data.manual_dir" in err


def test_cifar10_evaluate_stops_before_restoring(tmp_path):
  c = cifar10_fgm.get_config()
  c.job = "evaluate"
  with pytest.raises(config_checks.ConfigError, match="needs Inception-V3 weights for FID"):
    evaluate_lib.evaluate(c, str(tmp_path / "nothing_here"))
