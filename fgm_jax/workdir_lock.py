"""One writer per workdir: a lock file that names its holder (host, pid, start time).

Two training processes on one --workdir would race to write the same checkpoints. The first
takes ``<workdir>/lock.json``; a second stops with one line naming the holder. A lock whose
process is gone from this host (a SIGKILLed or crashed run) is stale and taken over with a
warning, so a relaunch after a crash needs no clean-up. Only process 0 of a multi-host run
takes it; read-only jobs (sample, evaluate, export) do not.

In a gs:// bucket the lock object is created with GCS's generation-match precondition, so of
two runs starting at once exactly one gets it, as with O_EXCL on a disk. What a bucket cannot
tell is whether a holder on another host is still alive: such a lock (a run on another VM, or
one killed with its VM) stops the new run with the holder's name and the object to delete.
"""

import contextlib
import json
import os
import socket
import time

import jax
from absl import logging

from fgm_jax import checkpoint
from fgm_jax import paths

LOCK_NAME = "lock.json"


class WorkdirLockedError(RuntimeError):
  """Another live process writes to this workdir."""


def _holder_alive(holder: dict) -> bool:
  """False only when the holder ran on this host and its pid is gone."""
  if holder.get("host") != socket.gethostname():
    return True  # cannot look at another host's processes: assume it is running
  try:
    os.kill(int(holder.get("pid", -1)), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, ValueError, OverflowError):
    return True
  return True


def _describe(holder: dict) -> str:
  started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
  return f"pid {holder.get('pid')} on host {holder.get('host')} (started {started})"


def _read(path) -> dict:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return {}  # half-written or unreadable: treated as a lock of unknown origin


def acquire(workdir: str):
  """Takes the lock of ``workdir`` for this process; returns the lock file's path, or None
  when this process holds it already (an outer block releases it)."""
  folder = checkpoint.as_path(workdir)
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / LOCK_NAME
  me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
  for _ in range(2):
    if _create_exclusive(path, me):
      return str(path)
    holder = _read(path)
    if holder.get("pid") == os.getpid() and holder.get("host") == me["host"]:
      return None  # this process holds it already
    if holder and _holder_alive(holder):
      raise WorkdirLockedError(
          f"--workdir={workdir} is in use by {_describe(holder)}: one run writes to a workdir "
          f"at a time. Wait for it, stop it, or use another --workdir (if that process is "
          f"surely gone, delete {path}).")
    logging.warning("Taking over the stale lock of %s (%s is gone).", workdir,
                    _describe(holder) if holder else "an unreadable lock file")
    path.unlink()
  raise WorkdirLockedError(f"could not take the lock {path}; another process took it first.")


def _create_exclusive(path, content: dict) -> bool:
  """Creates the lock file only if it does not exist: atomic on local disks and in gs://
  buckets alike (paths.create_exclusive)."""
  return paths.create_exclusive(path, json.dumps(content).encode("utf-8"))


def release(path: str):
  lock = checkpoint.as_path(path)
  holder = _read(lock)
  if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
    lock.unlink()


@contextlib.contextmanager
def held(workdir: str):
  """The workdir's lock for the duration of a block (process 0 only)."""
  if jax.process_index() != 0:
    yield
    return
  path = acquire(workdir)
  try:
    yield
  finally:
    if path is not None:
      release(path)
