"""Host allocator settings for runs that compute on the CPU.

XLA's CPU backend allocates every step's temporaries afresh (tens of MB for the digits U-Net
steps). glibc serves blocks that large with mmap and unmaps them when they are freed, so each
step faults its temporaries into memory again, page by page: the digits pipeline took 57.6
million page faults, 142 s of its 800 s of CPU time in the kernel (2-core machine,
experiments/results/digits.md). Keeping freed memory in the heap for reuse removes those
faults; it changes where buffers live, never what is computed.

Only blocks the main heap serves are reused: glibc gives each thread its own arena at the
thread's first allocation, and such an arena serves large blocks with mmap whatever the
settings. The digits teacher step allocates from the main heap (faults gone, the step about 9 %
faster); the FGM step's temporaries come from an XLA thread's arena and still fault. Forcing
one arena for all threads removed those faults too but did not make the FGM step faster, so it
is not done.
"""

import ctypes
import ctypes.util

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# Freed memory beyond this at the top of the heap goes back to the system (2 GiB, int max).
TRIM_THRESHOLD = 2**31 - 1


def _glibc():
  """glibc's handle, or None elsewhere (macOS, musl): those keep their own allocator."""
  name = ctypes.util.find_library("c")
  if not name:
    return None
  libc = ctypes.CDLL(name)
  return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def _mallopt(*settings) -> bool:
  """Applies (parameter, value) pairs; False off glibc or if glibc refused one."""
  libc = _glibc()
  if libc is None:
    return False
  return all([libc.mallopt(param, value) == 1 for param, value in settings])


def reuse_freed_memory() -> bool:
  """Large blocks from the heap, not mmap, and freed memory kept for reuse. Resident memory
  then stays at its peak, which is why only CPU-backend runs call this (main.py)."""
  return _mallopt((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))
