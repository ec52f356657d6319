"""host_memory.reuse_freed_memory: a freed large block is reused without page faults.

Checked in a fresh interpreter, since the setting is the whole process's allocator's.
"""

import subprocess
import sys

import pytest

from fgm_jax import host_memory

# Allocates and frees 64 MiB five times; prints the minor page faults that took, before and
# after the setting (one warm-up round after it, which grows the heap once).
_SCRIPT = """
import resource
import numpy as np
from fgm_jax import host_memory

def churn():
  start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(5):
    block = np.ones(64 << 20, np.uint8)
    del block
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

before = churn()
assert host_memory.reuse_freed_memory()
churn()
print(before, churn())
"""


@pytest.mark.skipif(host_memory._glibc() is None, reason="mallopt is glibc's")
def test_freed_blocks_are_reused_without_page_faults():
  out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                       check=True).stdout
  before, after = map(int, out.split())
  # Without it every 64 MiB block is a fresh mapping (>= 32 faults even with 2 MiB pages).
  assert before >= 5 * 32
  assert after < before // 10
