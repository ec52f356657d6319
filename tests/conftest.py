"""Every test process sees 8 fake CPU devices, so sharding is exercised everywhere.

Must run before anything imports jax.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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
