"""Every test process sees 8 fake CPU devices, so sharding is exercised everywhere.

Must run before anything imports jax.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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
  from tests import sd3_reference
  folder = str(tmp_path_factory.mktemp("sd3_tiny") / "sd3")
  return folder, sd3_reference.build_pipeline(folder)


# ------------------------------------------------------------------------- running alone
# The suite runs on 2 cores with pytest-xdist (-n 2). Tests marked `alone` start processes of
# their own whose collectives time out if the other worker starves them of CPU (gloo waits
# 30 s for a lagging peer), so while one runs, the other worker waits between its tests.
# A turnstile lock keeps the waiting `alone` test from being starved by the shared ones.


def pytest_configure(config):
  config.addinivalue_line("markers", "alone: run while no other test of the suite runs")


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
