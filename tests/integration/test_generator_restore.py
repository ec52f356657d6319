"""job=sample and job=export read only the generator's weights from an FGM checkpoint: not
the online flow, the optimizer states or the teacher (issue 25, item 3). orbax keeps every
array of a step in one OCDBT database, so the arrays have no files of their own to delete;
the test counts the bytes TensorStore reads from the checkpoint instead."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy

import fgm_jax
from fgm_jax import main as main_lib
from fgm_jax import params_tree
from fgm_jax.train import loop
from fgm_jax.train import run_dir
from tests import helpers

N = 256


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(config, workdir) of a tiny FGM run with an EMA, its teacher archived away."""
  root = tmp_path_factory.mktemp("generator_restore")
  teacher_dir, fgm_dir = str(root / "teacher"), str(root / "fgm")
  teacher = helpers.tiny_teacher_config(num_steps=10, every=10)
  teacher.model.hidden = 256  # generator-sized trees of 0.5 MB: reads well above metadata
  loop.train(teacher, teacher_dir, write_metrics=False, progress=False)
  config = helpers.tiny_fgm_config(teacher_dir, num_steps=10, every=10)
  config.teacher.model = teacher.model
  loop.train(config, fgm_dir, write_metrics=False, progress=False)
  shutil.move(teacher_dir, str(root / "archived_teacher"))
  return config, fgm_dir


def _bytes_read():
  """Bytes TensorStore has read from local files in this process so far."""
  import tensorstore as ts
  metrics = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read")
  return sum(v["value"] for m in metrics for v in m["values"])


def _nbytes(tree):
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def _with(config, **fields):
  c = config.copy_and_resolve_references()
  for key, value in fields.items():
    section, _, name = key.rpartition(".")
    setattr(c[section] if section else c, name, value)
  return c


def test_only_the_chosen_weights_are_read(run):
  config, fgm_dir = run
  before = _bytes_read()
  trainer, state = run_dir.restore_latest(config, fgm_dir)
  whole = _bytes_read() - before
  gen_bytes = _nbytes(state.gen_params)
  assert gen_bytes > 200_000
  # The state holds seven generator-sized trees (generator, EMA, online flow, and the two
  # Adam moments of each trained one): a whole restore reads them all.
  assert whole > 6 * gen_bytes
  for weights, want in (("ema", state.gen_ema_params), ("raw", state.gen_params)):
    before = _bytes_read()
    got = run_dir.restore_generator(config, fgm_dir, weights)
    read = _bytes_read() - before
    # (the excess: OCDBT's index nodes, and gaps TensorStore's read coalescing spans)
    assert read < 1.5 * gen_bytes, (weights, read, gen_bytes, whole)
    assert got.weights == weights and got.step == config.num_steps
    for a, b in zip(jax.tree.leaves(jax.device_get(got.params)),
                    jax.tree.leaves(jax.device_get(want))):
      np.testing.assert_array_equal(a, b)
    assert (jax.tree.leaves(got.params)[0].sharding
            == jax.tree.leaves(state.gen_params)[0].sharding)
  del trainer


def test_sample_and_export_give_the_whole_states_samples(run):
  """Without the teacher (archived) and from the generator's weights alone, job=sample and
  job=export give what the whole restored state samples, EMA and raw weights alike."""
  config, fgm_dir = run
  trainer, state = run_dir.restore_latest(config, fgm_dir)
  for weights in ("ema", "raw"):
    want = trainer.samples(state, N, config.sample.seed, weights).x
    main_lib.run(_with(config, job="sample", **{"sample.num": N, "sample.weights": weights}),
                 fgm_dir)
    np.testing.assert_array_equal(np.load(os.path.join(fgm_dir, "samples.npz"))["x"], want)
    out = os.path.join(fgm_dir, f"generator_{weights}")
    main_lib.run(_with(config, job="export", **{"export.weights": weights,
                                                "export.output": out}), fgm_dir)
    exported = safetensors.numpy.load_file(os.path.join(out, "generator.safetensors"))
    params = state.gen_ema_params if weights == "ema" else state.gen_params
    flat = params_tree.flatten(jax.device_get(params))
    assert sorted(exported) == sorted("/".join(path) for path in flat)
    for path, x in flat.items():
      np.testing.assert_array_equal(exported["/".join(path)], x)
    # (loaded on one device its matmuls split differently from the 8-device sampler's)
    np.testing.assert_allclose(fgm_jax.load_generator(out).sample(N, config.sample.seed),
                               want, rtol=1e-5, atol=1e-5)
    meta = json.loads(open(os.path.join(out, "generator.json")).read())
    assert meta["weights"] == weights and meta["step"] == config.num_steps
