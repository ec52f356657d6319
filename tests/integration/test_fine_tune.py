"""The fine-tuning stage (issue 26, item 2): a second FGM run whose generator starts from a
first run's chosen weights (config.fgm.init_generator='run', init_run, init_weights), with
the online flow from the teacher and fresh optimizers; a missing, unfinished or unfitting
first run, or weights it does not keep, stop with one line before anything compiles."""

import os
import shutil

import jax
import numpy as np
import pytest

from fgm_jax import checkpoint
from fgm_jax import main as main_lib
from fgm_jax import sharding as sharding_lib
from fgm_jax.train import loop
from fgm_jax.train import run_dir
from fgm_jax.train import trainers
from tests import helpers

FIRST_STEPS = 10


@pytest.fixture(scope="module")
def first(tmp_path_factory):
  """(teacher workdir, first-stage config, its workdir): 10 steps keeping an extra EMA."""
  root = tmp_path_factory.mktemp("fine_tune")
  teacher_dir = str(root / "teacher")
  with helpers.compilation_cache(helpers.worker_cache_dir(tmp_path_factory)):
    loop.train(helpers.tiny_teacher_config(num_steps=20, every=20), teacher_dir,
               write_metrics=False, progress=False)
    config = helpers.tiny_fgm_config(teacher_dir, num_steps=FIRST_STEPS, every=5)
    config.optim.extra_ema_decays = (0.8,)
    loop.train(config, str(root / "first"), write_metrics=False, progress=False)
    yield teacher_dir, config, str(root / "first")


def _second(first, **fgm_fields):
  teacher_dir, _, first_dir = first
  c = helpers.tiny_fgm_config(teacher_dir, num_steps=4, every=4)
  c.optim.lr = 3e-4  # its own learning rate
  c.fgm.init_generator, c.fgm.init_run, c.fgm.init_weights = "run", first_dir, "ema_0.8"
  for key, value in fgm_fields.items():
    c.fgm[key] = value
  return c


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _assert_equal(a, b):
  la, lb = _leaves(a), _leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)


def test_second_run_starts_from_the_first_runs_weights(first, tmp_path):
  _, first_config, first_dir = first
  _, done = run_dir.restore_latest(first_config, first_dir)
  config = _second(first)
  trainer = trainers.build(config, sharding_lib.mesh_from_config(config.mesh))
  start = trainer.init_state()
  assert int(start.step) == 0
  # Generator and every EMA: the first run's 'ema_0.8' weights, not its raw or 'ema' ones.
  for tree in (start.gen_params, start.gen_ema_params):
    _assert_equal(tree, done.gen_extra_emas["ema_0.8"])
  # Online flow from the teacher; fresh optimizers (zero moments, count 0).
  _assert_equal(start.online_params, trainer.teacher_params())
  assert all(not x.any() for x in _leaves(start.gen_opt_state))
  assert all(not x.any() for x in _leaves(start.online_opt_state))

  # It trains (the first run's online flow and optimizer were not needed), and its resume
  # does not go back to the first run.
  workdir = str(tmp_path / "second")
  _, end = loop.train(config, workdir, write_metrics=False, progress=False)
  assert int(end.step) == config.num_steps
  assert all(np.isfinite(x).all() for x in _leaves(end))
  moved = max(float(np.abs(a - b).max()) for a, b in
              zip(_leaves(end.gen_params), _leaves(start.gen_params)))
  assert moved > 0


def _one_line_error(config, workdir):
  status, message = main_lib.run_with_status(config, workdir)
  assert status == 2, message
  assert not os.path.isdir(os.path.join(workdir, "checkpoints"))  # stopped before training
  return message


def test_a_missing_unfinished_or_unfitting_first_run_is_one_line(first, tmp_path):
  teacher_dir, _, first_dir = first
  workdir = str(tmp_path / "second")
  empty = str(tmp_path / "empty")
  message = _one_line_error(_second(first, init_run=empty), workdir)
  assert f"config.fgm.init_run={empty!r}" in message and "no checkpoint" in message

  unfinished = str(tmp_path / "unfinished")
  shutil.copytree(first_dir, unfinished)
  shutil.rmtree(os.path.join(checkpoint.checkpoint_dir(unfinished), str(FIRST_STEPS)))
  message = _one_line_error(_second(first, init_run=unfinished), workdir)
  assert f"step 5 of its {FIRST_STEPS}" in message, message

  message = _one_line_error(_second(first, init_weights="ema_0.9"), workdir)
  assert "config.fgm.init_weights='ema_0.9'" in message
  assert "['ema', 'raw', 'ema_0.8']" in message, message

  other = _second(first)
  other.teacher.model.hidden = 48  # another architecture than the first run's generator
  message = _one_line_error(other, workdir)
  assert "config.fgm.init_run" in message and "hidden" in message, message

  message = _one_line_error(_second(first, init_run=""), workdir)
  assert "config.fgm.init_run is empty" in message, message
