"""A run never saves a non-finite state, a damaged newest checkpoint is set aside, and a
SIGTERM'd run saves and exits 143.

Reproduces the two faults of issue 10 on the tiny toy teacher (in this process, through
main's exit-status path): a learning rate that blows up, and a data file of the newest
checkpoint truncated as an interrupted copy leaves it. (Two processes: test_multiprocess.py.)
"""

import logging
import os
import signal
import threading
import time

import jax
import numpy as np
import pytest

from fgm_jax import checkpoint
from fgm_jax import distributed
from fgm_jax import main as main_lib
from fgm_jax.train import loop
from fgm_jax.train import run_dir
from tests import helpers


def _all_finite(tree):
  return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.inexact))


def _read(config, workdir, step):
  from fgm_jax import sharding as sharding_lib
  from fgm_jax.train import trainers
  trainer = trainers.build(config, sharding_lib.mesh_from_config(config.mesh))
  target = checkpoint.abstract_with_shardings(trainer.abstract_state, trainer.shardings)
  state, _ = checkpoint.read(checkpoint.checkpoint_dir(workdir), step, target)
  return jax.device_get(state)


def _diverging_config():
  c = helpers.tiny_teacher_config(num_steps=40, every=2)
  c.optim.lr = 1e3  # ramps up over the warmup; Adam's moments overflow after ~10 steps
  c.optim.warmup_steps = 50
  c.optim.grad_clip = 0.0
  c.log.every = 100
  return c


def test_diverging_run_saves_only_finite_checkpoints_and_resumes_from_the_newest(
    tmp_path, capsys, caplog):
  config, workdir = _diverging_config(), str(tmp_path)
  status, _ = main_lib.run_with_status(config, workdir)
  err = capsys.readouterr().err.strip()
  assert status == distributed.EXIT_DIVERGED
  assert len(err.splitlines()) == 1 and err.startswith("error: training diverged:"), err
  steps = checkpoint.steps(checkpoint.checkpoint_dir(workdir))
  newest = max(steps)
  ckpt_path = os.path.join(workdir, "checkpoints", str(newest))
  assert f"the newest checkpoint, step {newest} at {ckpt_path}, is finite" in err
  diverged_at = int(err.split("non-finite by step ")[1].split(";")[0])
  assert diverged_at == newest + 2 < config.num_steps  # the first save step after it
  assert all(_all_finite(_read(config, workdir, s)) for s in steps)

  # The same command again resumes from the newest checkpoint and stops at the same step.
  caplog.set_level(logging.INFO, logger="absl")  # absl keeps its own level
  with pytest.raises(loop.TrainingDiverged) as again:
    loop.train(config, workdir, write_metrics=False, progress=False)
  assert f"Resumed from the checkpoint of step {newest}." in caplog.text
  assert f"non-finite by step {diverged_at};" in str(again.value)
  assert checkpoint.steps(checkpoint.checkpoint_dir(workdir)) == steps


def _truncate_data_file(step_dir):
  """Cuts the arrays' data file (orbax merges every process's data into state/d/) in half."""
  folder = os.path.join(step_dir, "state", "d")
  largest = max((os.path.join(folder, f) for f in os.listdir(folder)), key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)


def test_truncated_newest_checkpoint_is_set_aside_and_training_resumes_from_the_previous(
    tmp_path, capsys, caplog):
  config = helpers.tiny_teacher_config(num_steps=30, every=10)
  _, reference = loop.train(config, str(tmp_path / "reference"), write_metrics=False,
                            progress=False)

  workdir = str(tmp_path / "damaged")
  short = helpers.tiny_teacher_config(num_steps=20, every=10)
  loop.train(short, workdir, write_metrics=False, progress=False)
  step_dir = os.path.join(workdir, "checkpoints", "20")
  _truncate_data_file(step_dir)

  # job=sample (and evaluate, export: the same restore) stops with one line; nothing moves.
  sample = short.copy_and_resolve_references()
  sample.job, sample.sample.num = "sample", 16
  status, _ = main_lib.run_with_status(sample, workdir)
  err = capsys.readouterr().err.strip()
  assert status == distributed.EXIT_USAGE and len(err.splitlines()) == 1, err
  assert err.startswith(f"error: checkpoint step 20 at {step_dir} cannot be read (")
  assert os.path.isdir(step_dir) and not os.path.exists(os.path.join(workdir, "samples.npz"))

  # Training sets it aside, says so in one line, and resumes from step 10.
  caplog.set_level(logging.INFO, logger="absl")  # absl keeps its own level
  _, state = loop.train(config, workdir, write_metrics=False, progress=False)
  moved = os.path.join(workdir, "checkpoints", "corrupt-20")
  assert f"Checkpoint step 20 at {step_dir} cannot be read (" in caplog.text
  assert f"moved it to {moved}" in caplog.text
  assert "Resumed from the checkpoint of step 10." in caplog.text
  assert os.path.isdir(moved)
  assert checkpoint.steps(checkpoint.checkpoint_dir(workdir)) == [10, 20, 30]
  # ... and ends exactly where a run that never saw the damaged checkpoint ends.
  _, restored = run_dir.restore_latest(config, workdir)
  for a, b, c in zip(*(jax.tree.leaves(jax.device_get(x)) for x in (reference, state, restored))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def test_sigterm_saves_the_step_it_is_at_and_exits_143(tmp_path, capsys):
  config = helpers.tiny_teacher_config(num_steps=100_000, every=50)
  config.checkpoint.async_save = False
  ckpt_dir = checkpoint.checkpoint_dir(str(tmp_path))

  def terminate_after_first_checkpoint():
    deadline = time.time() + 120
    while not checkpoint.steps(ckpt_dir) and time.time() < deadline:
      time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGTERM)  # handled in the main thread, by the train loop

  before = signal.getsignal(signal.SIGTERM)
  threading.Thread(target=terminate_after_first_checkpoint, daemon=True).start()
  status, _ = main_lib.run_with_status(config, str(tmp_path))
  err = capsys.readouterr().err.strip()
  assert status == 143, err
  steps = checkpoint.steps(ckpt_dir)
  stopped = max(steps)
  assert 50 < stopped < config.num_steps  # the step it was at, saved on the way out
  assert err == (f"stopped after step {stopped} (SIGTERM on process 0); saved "
                 f"{os.path.join(ckpt_dir, str(stopped))}. Run the same command again to "
                 "resume from it.")
  assert signal.getsignal(signal.SIGTERM) is before  # the loop's handler is gone
