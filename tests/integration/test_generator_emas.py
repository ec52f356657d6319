"""Several generator EMAs at once (config.optim.extra_ema_decays; issue 26, item 2): each
follows its own decay, is checkpointed and resumed exactly after SIGKILL, is chosen by name
for job=sample, evaluate and export (recorded in the export's metadata); a name the run does
not keep is refused in one line; a checkpoint saved before the field existed still restores."""

import json
import os
import sys

import jax
import numpy as np
import pytest

from fgm_jax import checkpoint
from fgm_jax import config_checks
from fgm_jax import main as main_lib
from fgm_jax.train import loop
from fgm_jax.train import run_dir
from fgm_jax.train import state as state_lib
from tests import helpers
from tests import xla_flags

EXTRA = (0.5, 0.8)  # far from ema_decay (0.999) and each other: 10 steps tell them apart
STEPS, EVERY, KILL = 120, 30, 60
N = 256


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  path = helpers.worker_cache_dir(tmp_path_factory)
  with helpers.compilation_cache(path):
    yield path


def _config(teacher_dir, **fields):
  c = helpers.tiny_fgm_config(teacher_dir, num_steps=STEPS, every=EVERY)
  c.optim.extra_ema_decays = EXTRA
  for key, value in fields.items():
    section, _, name = key.rpartition(".")
    setattr(c[section] if section else c, name, value)
  return c


@pytest.fixture(scope="module")
def runs(cache, tmp_path_factory):
  """(config, teacher_dir, uninterrupted workdir)."""
  root = tmp_path_factory.mktemp("emas")
  teacher_dir = str(root / "teacher")
  loop.train(helpers.tiny_teacher_config(num_steps=20, every=20), teacher_dir,
             write_metrics=False, progress=False)
  config = _config(teacher_dir)
  uninterrupted = _config(teacher_dir, **{"checkpoint.every": STEPS})  # (the same steps)
  loop.train(uninterrupted, str(root / "a"), write_metrics=False, progress=False)
  return config, teacher_dir, str(root / "a")


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _assert_equal(a, b, atol=0.0):
  la, lb = _leaves(a), _leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(x, y, rtol=0, atol=atol)


def test_each_ema_follows_its_own_decay(runs, tmp_path):
  """Two consecutive checkpoints: ema_k = d ema_(k-1) + (1 - d) gen_k, for every EMA."""
  config, teacher_dir, _ = runs
  c = _config(teacher_dir, num_steps=2, **{"checkpoint.every": 1})
  loop.train(c, str(tmp_path), write_metrics=False, progress=False)
  trainer, _ = run_dir.restore_latest(c, str(tmp_path))
  mgr = checkpoint.manager(checkpoint.checkpoint_dir(str(tmp_path)), async_save=False)
  (s1, _), (s2, _) = (run_dir.restore_or_init(trainer, mgr, k) for k in (1, 2))
  mgr.close()
  assert sorted(s2.gen_extra_emas) == ["ema_0.5", "ema_0.8"]
  for name, decay in [("ema", c.optim.ema_decay), ("ema_0.5", 0.5), ("ema_0.8", 0.8)]:
    e1, e2 = (_leaves(state_lib.generator_params(s, name)) for s in (s1, s2))
    for a, b, g in zip(e1, e2, _leaves(s2.gen_params)):
      np.testing.assert_allclose(b, decay * a + (1 - decay) * g, rtol=1e-6, atol=1e-7)
  assert not np.allclose(_leaves(s2.gen_extra_emas["ema_0.5"])[0],
                         _leaves(s2.gen_extra_emas["ema_0.8"])[0])


def test_sigkilled_run_resumes_its_emas_exactly(runs, cache, tmp_path):
  config, _, workdir_a = runs
  workdir = str(tmp_path / "b")
  cmd = [sys.executable, "-m", "fgm_jax.main", "--config=configs/toy2d_fgm.py",
         f"--workdir={workdir}", *helpers.overrides(config),
         f"--config.optim.extra_ema_decays={EXTRA}"]  # (overrides() leaves tuples out)
  env = dict(os.environ, XLA_FLAGS=xla_flags.for_devices(8), PYTHONPATH=helpers.ROOT,
             **helpers.compilation_cache_env(cache))
  ckpt_dir = checkpoint.checkpoint_dir(workdir)
  helpers.run_and_kill(cmd, env, helpers.checkpointed(ckpt_dir, KILL))
  killed_at = max(helpers.complete_steps(ckpt_dir))
  assert KILL <= killed_at < STEPS
  loop.train(config, workdir, write_metrics=False, progress=False)  # resumed here
  (_, a), (_, b) = (run_dir.restore_latest(config, w) for w in (workdir_a, workdir))
  assert int(a.step) == int(b.step) == STEPS
  assert sorted(b.gen_extra_emas) == ["ema_0.5", "ema_0.8"]
  _assert_equal(a, b, atol=1e-6)


def test_sample_evaluate_and_export_by_name(runs, tmp_path):
  config, _, workdir = runs
  trainer, state = run_dir.restore_latest(config, workdir)
  want = {w: trainer.samples(state, N, config.sample.seed, w).x
          for w in ("ema", "raw", "ema_0.5")}
  assert not np.allclose(want["ema_0.5"], want["ema"])
  assert not np.allclose(want["ema_0.5"], want["raw"])
  for weights in ("ema_0.5", "raw"):
    c = config.copy_and_resolve_references()
    c.job, c.sample.num, c.sample.weights = "sample", N, weights
    main_lib.run(c, workdir)
    np.testing.assert_array_equal(np.load(os.path.join(workdir, "samples.npz"))["x"],
                                  want[weights])

  c = config.copy_and_resolve_references()
  c.job, c.export.weights, c.export.output = "export", "ema_0.8", str(tmp_path / "gen")
  main_lib.run(c, workdir)
  meta = json.loads((tmp_path / "gen" / "generator.json").read_text())
  assert (meta["weights"], meta["ema_decay"], meta["use_ema"]) == ("ema_0.8", 0.8, True)
  assert "(EMA 0.8 weights)" in (tmp_path / "gen" / "README.md").read_text()

  c = config.copy_and_resolve_references()
  c.job, c.eval.weights, c.eval.num_samples, c.eval.teacher_steps = "evaluate", "ema_0.5", \
      N, (1,)
  results = main_lib.run(c, workdir)
  assert results["weights"] == "ema_0.5"
  # The 1-step set's metric is the one of the named weights: same noise, other weights.
  c.eval.weights = "raw"
  raw = main_lib.run(c, workdir)
  assert raw["weights"] == "raw" and raw["fgm_1step"] != results["fgm_1step"]
  assert raw["teacher_euler_1step"] == results["teacher_euler_1step"]


@pytest.mark.parametrize("field, value, message", [
    ("sample.weights", "ema_0.9", "config.sample.weights='ema_0.9' is not kept by this run; "
     "choose one of ['ema', 'raw', 'ema_0.5', 'ema_0.8']."),
    ("export.weights", "best", "config.export.weights='best' is not kept by this run"),
    ("optim.extra_ema_decays", (0.5, 1.0), "each decay must lie in (0, 1)"),
    ("optim.extra_ema_decays", (0.5, 0.999), "repeats a decay or ema_decay=0.999"),
    ("online_optim.extra_ema_decays", (0.9,), "only an FGM generator keeps extra EMAs"),
])
def test_bad_names_and_decays_are_one_line(runs, field, value, message):
  config, _, workdir = runs
  c = config.copy_and_resolve_references()
  c.job = field.split(".")[0] if field.split(".")[0] in ("sample", "export") else "sample"
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(config_checks.ConfigError) as e:
    main_lib.run(c, workdir)
  assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_checkpoint_saved_before_the_field_restores_it_empty(runs, tmp_path):
  """A state saved without gen_extra_emas (as before it existed) restores with {} there,
  whole (resume) and generator-only (sample)."""
  config, _, workdir = runs
  _, state = run_dir.restore_latest(config, workdir)
  old_dir = checkpoint.checkpoint_dir(str(tmp_path))
  old = {f: getattr(state, f) for f in ("step", "gen_params", "gen_opt_state",
                                        "gen_ema_params", "online_params", "online_opt_state")}
  mgr = checkpoint.manager(old_dir, async_save=False)
  checkpoint.save(mgr, STEPS, old, checkpoint.read_meta(checkpoint.checkpoint_dir(workdir)),
                  force=True)
  mgr.wait_until_finished()
  mgr.close()
  assert "gen_extra_emas" not in checkpoint.saved_tree(old_dir, STEPS)
  c = config.copy_and_resolve_references()
  c.optim.extra_ema_decays = ()
  _, restored = run_dir.restore_latest(c, str(tmp_path))
  assert restored.gen_extra_emas == {}
  _assert_equal({k: getattr(restored, k) for k in old}, old)
  generator = run_dir.restore_generator(c, str(tmp_path), "ema")
  _assert_equal(generator.params, state.gen_ema_params)
