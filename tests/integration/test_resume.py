"""A training process killed with SIGKILL resumes and ends exactly where an uninterrupted
run ends (teacher and FGM runs, through the real command line)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from fgm_jax.train import loop
from fgm_jax.train import run_dir
from tests import helpers
from tests import xla_flags

# Each run is killed once two checkpoints exist (the resume must pick the newest) and has
# steps and checkpoints left to redo. Kept short: every checkpoint costs ~1.7 s on 8 fake CPU
# devices, more than 50 toy steps.
TEACHER_STEPS, TEACHER_EVERY, TEACHER_KILL = 160, 40, 80
FGM_STEPS, FGM_EVERY, FGM_KILL = 120, 30, 60


def _cmd(config_file, workdir, config):
  return [sys.executable, "-m", "fgm_jax.main", f"--config={config_file}",
          f"--workdir={workdir}", *helpers.overrides(config)]


_CACHE = {}  # the module's compilation-cache folder, for the subprocesses


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags.for_devices(8)  # same mesh and compilation as in-process
  env["PYTHONPATH"] = helpers.ROOT
  # The killed and the resumed runs compile what the in-process run compiled: with the cache
  # they start stepping at once (which also keeps the kill mid-run on a loaded machine).
  env.update(helpers.compilation_cache_env(_CACHE["dir"]))
  return env


def _run(cmd):
  subprocess.run(cmd, cwd=helpers.ROOT, env=_env(), check=True, capture_output=True)


def _run_and_kill(cmd, ckpt_dir, kill_after_step):
  """Starts a run, SIGKILLs it once a checkpoint >= kill_after_step exists, returns that step."""
  helpers.run_and_kill(cmd, _env(), helpers.checkpointed(ckpt_dir, kill_after_step))
  return max(helpers.complete_steps(ckpt_dir))


def _final_params(config, workdir):
  job, state = run_dir.restore_latest(config, workdir)
  return int(state.step), jax.device_get(state)


def _assert_same_state(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  _CACHE["dir"] = helpers.worker_cache_dir(tmp_path_factory)
  with helpers.compilation_cache(_CACHE["dir"]):
    return _runs(tmp_path_factory)


def _runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("resume")
  teacher = helpers.tiny_teacher_config(num_steps=TEACHER_STEPS, every=TEACHER_EVERY)
  teacher.checkpoint.async_save = True
  out = {"teacher_config": teacher}
  # Uninterrupted teacher (in this process, same 8-device mesh), and one killed after its
  # step-80 checkpoint, then resumed, through the command line.
  loop.train(teacher, str(root / "teacher_a"), write_metrics=False, progress=False)
  killed_at = _run_and_kill(_cmd("configs/toy2d_teacher.py", root / "teacher_b", teacher),
                            str(root / "teacher_b" / "checkpoints"), TEACHER_KILL)
  out["teacher_killed_at"] = killed_at
  _run(_cmd("configs/toy2d_teacher.py", root / "teacher_b", teacher))
  out["teacher_a"] = _final_params(teacher, str(root / "teacher_a"))
  out["teacher_b"] = _final_params(teacher, str(root / "teacher_b"))

  # A data-free FGM run, uninterrupted only: the real-data run below must differ from it.
  # (A data-free FGM run killed and resumed: test_generator_emas.py, with its extra EMAs.)
  fgm = helpers.tiny_fgm_config(str(root / "teacher_a"), num_steps=FGM_STEPS, every=FGM_EVERY)
  loop.train(fgm, str(root / "fgm_a"), write_metrics=False, progress=False)
  out["fgm_a"] = _final_params(fgm, str(root / "fgm_a"))

  # FGM with RealUID's real-data stream (two online updates, a batch each): the generator,
  # online flow, optimisers, EMA and the stream's position all resume at the killed step.
  real = helpers.tiny_fgm_config(str(root / "teacher_a"), num_steps=FGM_STEPS, every=FGM_EVERY)
  real.fgm.alpha, real.fgm.online_steps = 0.5, 2
  real.fgm.real_data.update(dict(enabled=True, alpha=0.9, beta=0.92))
  loop.train(real, str(root / "real_a"), write_metrics=False, progress=False)
  out["real_killed_at"] = _run_and_kill(_cmd("configs/toy2d_fgm.py", root / "real_b", real),
                                        str(root / "real_b" / "checkpoints"), FGM_KILL)
  _run(_cmd("configs/toy2d_fgm.py", root / "real_b", real))
  out["real_a"] = _final_params(real, str(root / "real_a"))
  out["real_b"] = _final_params(real, str(root / "real_b"))
  return out


def test_teacher_resumes_exactly_after_sigkill(runs):
  assert TEACHER_KILL <= runs["teacher_killed_at"] < TEACHER_STEPS  # really killed mid-run
  (step_a, a), (step_b, b) = runs["teacher_a"], runs["teacher_b"]
  assert step_a == step_b == TEACHER_STEPS
  _assert_same_state(a, b)


def test_real_data_fgm_resumes_exactly_after_sigkill(runs):
  assert FGM_KILL <= runs["real_killed_at"] < FGM_STEPS
  (step_a, a), (step_b, b) = runs["real_a"], runs["real_b"]
  assert step_a == step_b == FGM_STEPS
  _assert_same_state(a, b)
  # and the real data mattered: it is not the data-free run
  assert max(float(abs(x - y).max()) for x, y in zip(
      jax.tree.leaves(a.online_params), jax.tree.leaves(runs["fgm_a"][1].online_params))) > 1e-4
