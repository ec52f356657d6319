"""Every test process sees 8 fake CPU devices, so sharding is exercised everywhere.

Must run before anything imports jax.
"""

import os

from tests import xla_flags  # noqa: E402  (imports nothing)

# Unoptimised LLVM: compiling is most of the suite's time (tests/xla_flags.py).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " +
                           xla_flags.for_devices(8)).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# libtpu is installed for the TPU compile tests (tests/unit/test_aot.py); without this every jax
# start would try to open a TPU first. Compiling for a TPU topology does not need it.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import contextlib  # noqa: E402
import fcntl  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

from tests import torchvision_without_ops  # noqa: E402

# Before anything imports torchvision (transformers and diffusers do when it is installed):
# requirements-test.txt's torchvision has no CPU build of its compiled ops.
torchvision_without_ops.install()


@pytest.fixture(scope="session")
def sd3_tiny(tmp_path_factory):
  """(folder, diffusers pipeline) of one tiny random SD3 folder, shared by the SD3 tests
  (building it imports torch/diffusers and writes seven components: once is enough)."""
  from tests.parity.reference import sd3_reference
  folder = str(tmp_path_factory.mktemp("sd3_tiny") / "sd3")
  return folder, sd3_reference.build_pipeline(folder)


# ------------------------------------------------------------------------- running alone
# The suite runs on 2 cores with pytest-xdist (-n 2). Tests marked `alone` start processes of
# their own whose collectives time out if the other worker starves them of CPU (gloo waits
# 30 s for a lagging peer), so while one runs, the other worker waits between its tests.
# A turnstile lock keeps the waiting `alone` test from being starved by the shared ones.


def pytest_configure(config):
  config.addinivalue_line("markers", "alone: run while no other test of the suite runs")
  # Files go to the xdist workers in collection order (see "file order" below), which
  # --loadscope-reorder (xdist's default) would replace by their number of tests.
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


@contextlib.contextmanager
def _suite_lock(exclusive: bool):
  run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
  if not run_id:  # one process: nothing runs beside this test anyway
    yield
    return
  base = os.path.join(tempfile.gettempdir(), f"fgm_jax_tests_{run_id}")
  with open(base + ".turnstile", "a") as turnstile, open(base + ".room", "a") as room:
    fcntl.flock(turnstile, fcntl.LOCK_EX)
    if exclusive:
      fcntl.flock(room, fcntl.LOCK_EX)  # waits for the other worker's current test
    else:
      fcntl.flock(turnstile, fcntl.LOCK_UN)
      fcntl.flock(room, fcntl.LOCK_SH)
    try:
      yield
    finally:
      fcntl.flock(room, fcntl.LOCK_UN)
      if exclusive:
        fcntl.flock(turnstile, fcntl.LOCK_UN)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  with _suite_lock(item.get_closest_marker("alone") is not None):
    yield


# ------------------------------------------------------------------------------ file order
# With `-n 2 --dist loadfile` each worker takes the next whole file when it runs low, so the
# suite ends when the last file does. Heaviest first (longest-processing-time order) lets the
# short files fill in at the end and both workers finish together. Seconds per file, measured
# on 2 loaded cores (`--durations=0`, summed per file); `alone` files count double (the other
# worker waits). Unlisted files count as DEFAULT_FILE_SECONDS: add a heavy new file here.
FILE_SECONDS = {
    "test_multiprocess.py": 2 * 75,  # (last instead of first: 12:42 vs 12:16-12:22)
    "test_images_training.py": 200,
    "test_realuid.py": 100,  # the 1-D closed form trains an MLP; 8 devices vs 1
    "test_sd3_sampler.py": 150,
    "test_generator_artifact.py": 120,
    "test_mixed_precision.py": 100,
    "test_cifar10_rf_fid.py": 80,  # 76.6 s on 2026-12-06
    "test_sd3_prompt_cache.py": 90,
    "test_sd3_fgm.py": 140,
    "test_sd3_lora.py": 120,  # LoRA FGM on the tiny SD3 folder, diffusers + peft outside pytest
    "test_lora.py": 40,
    "test_unet.py": 80,
    "test_trainer_sharding.py": 80,
    "test_mmdit_parity.py": 64,
    "test_resume.py": 85,  # 2026-12-07: + the real-data (RealUID) kill and resume
    "test_pipeline.py": 57,
    "test_attention_padding.py": 56,
    "test_mmdit_scan.py": 55,
    "test_vae_parity.py": 53,
    "test_rectified_flow_import.py": 70,  # + the RealUID recipe (55 s quiet, 2026-12-07)
    "test_digits_metric.py": 35,
    "test_checkpoint_faults.py": 33,
    "test_fid.py": 40,
    "test_inception_parity.py": 35,
    "test_mmdit_sharding.py": 30,
    "test_notebook.py": 30,
    "test_sd3_text.py": 30,
    "test_mnist5k.py": 57,
    "test_gcs_bucket.py": 80,  # 2026-12-06 with the SD3 chain (75.6 s on a quiet machine)
    "test_aot.py": 70,  # 2026-12-06: the TPU compiles and the cache restart
    "test_generator_emas.py": 45,  # a SIGKILLed run and its resume; evaluate by name
    "test_generator_restore.py": 30,
}
DEFAULT_FILE_SECONDS = 15


# Files at or above this many seconds are marked `slow`: `-m "not slow"` is the fast subset
# to run while working (README), the whole suite what CI runs.
SLOW_FILE_SECONDS = 30
KINDS = ("unit", "parity", "integration")  # tests/<kind>/: also the test's marker


def pytest_collection_modifyitems(config, items):
  weight = lambda item: FILE_SECONDS.get(item.path.name, DEFAULT_FILE_SECONDS)
  for item in items:
    kind = item.path.parent.name
    if kind in KINDS:
      item.add_marker(kind)
    if weight(item) >= SLOW_FILE_SECONDS:
      item.add_marker("slow")
  items.sort(key=weight, reverse=True)  # stable: tests keep their order within a file

