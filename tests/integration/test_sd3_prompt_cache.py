"""The SD3 prompt-embedding cache: same embeddings as encode_prompt, on 8 devices as on 1,
exact resume after an interrupted run, refusal of other settings, clear input errors."""

import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest

from configs import sd3_prompts
from fgm_jax import config_checks
from fgm_jax import main as main_lib
from fgm_jax import sharding as sharding_lib
from fgm_jax.convert import common as convert_common
from fgm_jax.sd3 import prompt_cache
from fgm_jax.sd3 import text
from tests.parity.reference import sd3_reference as ref

pytest.importorskip("torch")
NUM_PROMPTS, SHARD = 10, 4  # 3 shards, the last one short


@pytest.fixture(scope="module")
def setup(sd3_tiny, tmp_path_factory):
  root = tmp_path_factory.mktemp("cache")
  folder, pipe = sd3_tiny
  # Blank lines are not prompts (the empty prompt is the separate unconditional embedding).
  prompts = [p for p in ref.prompts_with_edge_cases(pipe.tokenizer) if p] + ref.PROMPT_TEXTS
  prompts = (prompts + ["a cat and a dog on a table", "a blue car"])[:NUM_PROMPTS]
  prompts_file = root / "prompts.txt"
  prompts_file.write_text("\n".join(prompts) + "\n")
  config = sd3_prompts.get_config()
  config.sd3.folder, config.prompts = folder, str(prompts_file)
  config.sd3.t5_length, config.shard_size, config.batch_size = 32, SHARD, 8
  full = str(root / "full")
  main_lib.run(config, full)  # all 8 devices
  return config, prompts, full, root


def _files(cache_dir):
  out = {}
  for name in sorted(os.listdir(cache_dir)):
    if name.endswith(".npz"):
      with np.load(os.path.join(cache_dir, name)) as z:
        out[name] = {k: z[k] for k in z.files}
  return out


def _assert_same_files(a, b):
  assert a.keys() == b.keys()
  for name in a:
    for key in a[name]:
      np.testing.assert_array_equal(a[name][key], b[name][key], err_msg=f"{name}:{key}")


def test_cache_holds_encode_prompt_embeddings(setup):
  config, prompts, full, _ = setup
  manifest = prompt_cache.read_manifest(full)
  assert manifest["complete"] and manifest["num_shards"] == 3
  assert manifest["settings"]["t5_length"] == 32 and manifest["settings"]["num_prompts"] == 10
  rows, uncond = prompt_cache.load(full)
  encoders = text.load(config.sd3.folder, t5_length=32)
  want_ctx, want_pooled = text.encode_prompt(encoders, prompts)
  assert rows["context"].dtype == ml_dtypes.bfloat16
  assert rows["context"].shape == (10, ref.CLIP_LENGTH + 32, ref.T5["d_model"])
  # Stored in bf16: equal to the fp32 embeddings up to bf16 rounding (8 bits of mantissa).
  np.testing.assert_allclose(rows["context"].astype(np.float32), want_ctx, rtol=1e-2,
                             atol=1e-2 * np.abs(want_ctx).max())
  np.testing.assert_allclose(rows["pooled"], want_pooled, rtol=1e-5, atol=1e-6)
  neg_ctx, neg_pooled = text.encode_prompt(encoders, [""])
  np.testing.assert_allclose(uncond["pooled"], neg_pooled, rtol=1e-5, atol=1e-6)
  with np.load(os.path.join(full, prompt_cache.shard_name(2))) as z:
    assert list(z["index"]) == [8, 9] and list(z["prompt"]) == prompts[8:]


def test_one_device_gives_the_same_embeddings(setup):
  config, _, full, root = setup
  single = str(root / "single")
  prompt_cache.write(config, single, mesh=sharding_lib.make_mesh(1, 1, 1, jax.devices()[:1]))
  a, b = _files(full), _files(single)
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_allclose(b[name]["pooled"], a[name]["pooled"], rtol=1e-5, atol=1e-6)
    ctx_a = a[name]["context"].view(ml_dtypes.bfloat16).astype(np.float32)
    ctx_b = b[name]["context"].view(ml_dtypes.bfloat16).astype(np.float32)
    # One bf16 ulp at most where fp32 reduction order moved a value across a rounding edge.
    np.testing.assert_allclose(ctx_b, ctx_a, rtol=2 ** -7, atol=1e-6)


def test_interrupted_run_resumes_to_the_same_files(setup):
  """What a writer killed while writing shard 1 leaves: shard 0, a temporary half of shard
  1, an incomplete manifest. The restart skips shard 0 and ends with identical files."""
  config, _, full, root = setup
  stopped = str(root / "stopped")
  shutil.copytree(full, stopped)
  for k in (1, 2):
    os.remove(os.path.join(stopped, prompt_cache.shard_name(k)))
  os.remove(os.path.join(stopped, prompt_cache.UNCOND))
  half = os.path.join(stopped, f".{prompt_cache.shard_name(1)}.999.tmp")  # paths.write_bytes' name
  with open(half, "wb") as f:
    f.write(b"PK\x03\x04 half a zip")
  first = os.path.join(stopped, prompt_cache.shard_name(0))
  mtime = os.stat(first).st_mtime_ns
  main_lib.run(config, stopped)
  _assert_same_files(_files(full), _files(stopped))
  assert os.stat(first).st_mtime_ns == mtime  # finished shards are not redone
  assert not os.path.exists(half)  # the killed writer's half shard is removed
  assert prompt_cache.read_manifest(stopped)["complete"]


def test_cache_of_other_settings_is_refused(setup):
  config, _, full, _ = setup
  other = config.copy_and_resolve_references()
  other.sd3.t5_length = 77
  with pytest.raises(config_checks.ConfigError, match="t5_length: 32 there, 77 now"):
    main_lib.run(other, full)


def test_cache_records_the_folders_text_encoders(setup, tmp_path, caplog):
  """cache.json names the text encoders and tokenizers it was encoded with (hashes of their
  configs and tokenizer files); a cache of an older version, without them, is accepted with a
  warning, its other settings still checked."""
  import json
  config, _, full, _ = setup
  saved = prompt_cache.read_manifest(full)["settings"]
  identity = text.folder_identity(config.sd3.folder)
  assert saved["folder_identity"] == identity
  assert sorted(identity) == sorted(text.CLIP_SUBFOLDERS + (text.T5_SUBFOLDER,)
                                    + text.TOKENIZERS)
  wanted = text.folder_settings(config.sd3.folder, 32)
  prompt_cache.require_settings(full, wanted)  # the same folder: accepted
  old = tmp_path / "old"
  shutil.copytree(full, old)
  manifest = json.loads((old / "cache.json").read_text())
  del manifest["settings"]["folder_identity"]
  (old / "cache.json").write_text(json.dumps(manifest))
  with caplog.at_level("WARNING"):
    prompt_cache.require_settings(str(old), wanted)
  assert "records no folder_identity" in caplog.text and "rebuild it" in caplog.text
  with pytest.raises(config_checks.ConfigError, match="t5_length: 32 there, 77 here"):
    prompt_cache.require_settings(str(old), text.folder_settings(config.sd3.folder, 77))


def test_bad_inputs_stop_with_one_clear_error(setup, tmp_path):
  config, _, _, _ = setup
  c = config.copy_and_resolve_references()
  empty = tmp_path / "empty.txt"
  empty.write_text("\n \n")
  c.prompts = str(empty)
  with pytest.raises(prompt_cache.PromptFileError, match="holds no prompts"):
    main_lib.run(c, str(tmp_path / "a"))
  c.prompts = str(tmp_path / "missing.txt")
  with pytest.raises(prompt_cache.PromptFileError, match="no such prompt file"):
    main_lib.run(c, str(tmp_path / "b"))
  # A folder whose T5 slot holds a CLIP model: named before any weight is read.
  wrong = str(tmp_path / "wrong")
  shutil.copytree(config.sd3.folder, wrong)
  shutil.rmtree(os.path.join(wrong, "text_encoder_3"))
  shutil.copytree(os.path.join(wrong, "text_encoder"), os.path.join(wrong, "text_encoder_3"))
  c = config.copy_and_resolve_references()
  c.sd3.folder = wrong
  with pytest.raises(convert_common.ConversionError, match="text_encoder_3"):
    main_lib.run(c, str(tmp_path / "c"))
  c.sd3.folder = None
  with pytest.raises(config_checks.ConfigError, match="config.sd3.folder is not set"):
    main_lib.run(c, str(tmp_path / "d"))


def _finished_shards(cache_dir):
  if not os.path.isdir(cache_dir):
    return 0
  return sum(n.startswith("shard-") for n in os.listdir(cache_dir))  # temporaries: ".shard-"


def _cli_command(config, workdir):
  """The prompt_cache job's command line for ``config`` and its environment."""
  import sys
  from tests import helpers
  from tests import xla_flags
  env = dict(os.environ, PYTHONPATH=helpers.ROOT,
             XLA_FLAGS=xla_flags.for_devices(8))  # the in-process mesh and compilation
  args = [sys.executable, "-m", "fgm_jax.main", "--config=configs/sd3_prompts.py",
          f"--workdir={workdir}", f"--config.sd3.folder={config.sd3.folder}",
          f"--config.prompts={config.prompts}", f"--config.shard_size={config.shard_size}",
          f"--config.batch_size={config.batch_size}",
          f"--config.sd3.t5_length={config.sd3.t5_length}"]
  return args, env


def test_writer_killed_mid_run_resumes_to_the_same_shards(setup, tmp_path):
  """A real SIGKILL of the command-line writer once some shards exist; the rerun finishes
  with files identical to an uninterrupted run."""
  config, _, _, _ = setup
  c = config.copy_and_resolve_references()
  prompts = [f"a photo of {n} cats and a dog" for n in range(40)]
  (tmp_path / "many.txt").write_text("\n".join(prompts) + "\n")
  c.prompts, c.shard_size = str(tmp_path / "many.txt"), 1
  uninterrupted = str(tmp_path / "uninterrupted")
  main_lib.run(c, uninterrupted)
  killed = str(tmp_path / "killed")
  from tests import helpers
  helpers.run_and_kill(*_cli_command(c, killed), lambda: _finished_shards(killed) >= 1, timeout=240)
  assert 1 <= _finished_shards(killed) < len(prompts)
  assert not prompt_cache.read_manifest(killed)["complete"]
  main_lib.run(c, killed)
  _assert_same_files(_files(uninterrupted), _files(killed))
