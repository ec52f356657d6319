"""Multi-process runs: start-up, one writer, stopping together and failing together.

Every host of a TPU pod slice or GPU cluster runs the same command. ``initialize`` connects
the processes (``jax.distributed.initialize``) before anything touches a device; with one
process it does nothing, so the same code runs on a laptop:

    distributed.initialize(coordinator_address="10.0.0.1:1234", num_processes=4,
                           process_id=rank)               # explicit, or from JAX_* variables
    distributed.initialize(auto=True)                      # TPU pods, SLURM, Open MPI, k8s

Afterwards:

    distributed.is_writer()          process 0: the one that writes metrics, plots, files
    distributed.to_host(x)           a whole global array as numpy, on every process
    distributed.StopAgreement()      SIGTERM / Ctrl-C on any process -> one common stop step
    distributed.all_succeeded(ok)    True only when ``ok`` holds on every process
    distributed.barrier(name)        a barrier with a deadline (no silent hang)
    distributed.report_failure(msg)  tells the others this process is going down

Why the last one: when one process dies, the others sit in a collective that never completes
(jax 0.10.2 on CPU: for the 300 s shutdown timeout, then abort). ``initialize`` therefore
starts a watcher thread that polls the coordination service's key-value store; a process
that fails publishes one line there, and every other process prints it (naming the failed
process) and exits with status ``EXIT_PEER_FAILED`` within seconds. A process that vanishes
without a word (SIGKILL, a lost host) is caught by jax's heartbeat instead, after
``heartbeat_timeout`` seconds. The CPU backend needs a cross-process collectives
implementation; jax 0.10.2 defaults to gloo, which we set explicitly.
"""

import os
import signal
import sys
import threading
import time

from absl import logging

# Exit statuses of fgm_jax.main (BUILD.md, "Multi-host runs and preemption").
EXIT_ERROR = 1          # a crash (traceback), or another process of the run failed
EXIT_USAGE = 2          # a problem with the inputs: config, files, workdir, checkpoint
EXIT_DIVERGED = 3       # training became non-finite; the newest checkpoint is finite
EXIT_PEER_FAILED = EXIT_ERROR

_PREFIX = "fgm_jax/"
_FAILURE_KEY = _PREFIX + "failure"
_STOP_KEY = _PREFIX + "stop/request"
_STOP_AT = _PREFIX + "stop/at/"
_GRACE_S = 2.0  # a watcher waits this long so that a process failing too says its own error
_POLL_MS = 500  # how often the watcher looks for failures and stop requests
_AGREE_TIMEOUT_MS = 10 * 60 * 1000


class _State:
  initialized = False
  closing = False
  watcher = None


def _env_int(name):
  value = os.environ.get(name)
  return int(value) if value not in (None, "") else None


def settings(coordinator_address=None, num_processes=None, process_id=None):
  """The explicit (address, count, id), completed from JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES and JAX_PROCESS_ID; (None, None, None) when nothing is set."""
  address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  count = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
  index = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
  given = [x is not None for x in (address, count, index)]
  if any(given) and not all(given):
    raise ValueError(
        "a multi-process run needs all three of --coordinator_address, --num_processes and "
        "--process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); got "
        f"address={address!r}, num_processes={count!r}, process_id={index!r}.")
  return address, count, index


def initialize(coordinator_address=None, num_processes=None, process_id=None, *, auto=False,
               heartbeat_timeout_s=100, initialization_timeout_s=300) -> bool:
  """Connects this process to the others; True when the run has several processes.

  Explicit settings (arguments or JAX_* variables) win; ``auto`` lets jax find them (TPU pod
  metadata, SLURM, Open MPI, k8s). Neither, or one process: nothing happens. Must run before
  anything creates a jax backend.
  """
  address, count, index = settings(coordinator_address, num_processes, process_id)
  if address is None and not auto:
    return False
  if count == 1:
    return False
  import jax
  # CPU hosts (and the tests' fake-device processes) need a cross-process collectives
  # library for every all-reduce; gloo is jax 0.10.2's default, set here so that it stays so.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = dict(heartbeat_timeout_seconds=int(heartbeat_timeout_s),
                initialization_timeout=int(initialization_timeout_s))
  if address is not None:
    kwargs.update(coordinator_address=address, num_processes=count, process_id=index)
  jax.distributed.initialize(**kwargs)
  _State.initialized = True
  logging.info("Process %d of %d, %d local devices of %d.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  if jax.process_count() > 1:
    _State.watcher = threading.Thread(target=_watch, name="fgm_jax-watcher", daemon=True)
    _State.watcher.start()
  return jax.process_count() > 1


def _client():
  from jax._src import distributed as jax_distributed
  return jax_distributed.global_state.client


def process_index() -> int:
  import jax
  return jax.process_index()


def process_count() -> int:
  import jax
  return jax.process_count()


def is_multiprocess() -> bool:
  return _State.initialized and process_count() > 1


def is_writer() -> bool:
  """Process 0 writes whatever exists once per run (metrics, plots, samples, reports)."""
  return process_index() == 0


def to_host(x):
  """A numpy copy of a whole (global) array on every process; in a multi-process run the
  rows held by other processes' devices are gathered first."""
  import numpy as np
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# --- failing together ------------------------------------------------------------------------


def report_failure(message: str):
  """Publishes ``process <i>: <message>`` so that the other processes stop too; returns once
  they had a moment to read it (process 0 hosts the store: leaving at once would take the
  message with it)."""
  if not is_multiprocess():
    return
  _State.closing = True  # our own watcher must not report this failure back to us
  text = f"process {process_index()}: {message}"
  try:
    _client().key_value_set(_FAILURE_KEY, text)
  except Exception:  # pylint: disable=broad-except
    return  # another process failed first (the key exists), or the coordinator is gone
  time.sleep(_GRACE_S)


def closing():
  """A normal end: stops the watcher before jax's shutdown (a thread still inside a
  coordination-service call when the interpreter exits aborts the process)."""
  _State.closing = True
  if _State.watcher is not None:
    _State.watcher.join(timeout=10 * _POLL_MS / 1000)
    _State.watcher = None


def _watch():
  """Polls the coordination service (about once per _POLL_MS) for a failed process and for a
  stop request, independently of the main thread, which may be waiting on devices that wait
  on the other processes."""
  client, me = _client(), process_index()
  while not _State.closing:
    try:
      failure = _get(client, _FAILURE_KEY, _POLL_MS)
      if _State.closing:
        return
      if failure is not None and not failure.startswith(f"process {me}:"):
        time.sleep(_GRACE_S)  # our own main thread may be failing the same way: let it speak
        if not _State.closing:
          _exit_now(f"error: stopping process {me} because {failure}", EXIT_PEER_FAILED)
        return
      if _Stop.stop_step is None:
        reason = _get(client, _STOP_KEY)
        if reason is not None:
          _agree_on_stop_step(client, reason)
    except Exception as e:  # pylint: disable=broad-except
      if _State.closing:
        return
      _exit_now(f"error: stopping process {me} because the coordinator (process 0) stopped "
                f"answering ({_first_line(e)})", EXIT_PEER_FAILED)


def _get(client, key, timeout_ms=None):
  """The value of ``key``, or None when it is not set (within ``timeout_ms``, if given)."""
  try:
    if timeout_ms is None:
      return client.key_value_try_get(key)
    return client.blocking_key_value_get(key, timeout_ms)
  except Exception as e:  # pylint: disable=broad-except
    if "NOT_FOUND" in str(e) or "DEADLINE_EXCEEDED" in str(e):
      return None
    raise


def _first_line(error) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def _exit_now(message: str, status: int):
  """Leaves without jax's shutdown barrier, which would wait for processes that never come."""
  print(message, file=sys.stderr, flush=True)
  sys.stdout.flush()
  logging.flush()
  os._exit(status)  # pylint: disable=protected-access


def exit_after_failure(status: int, message: str):
  """The end of a process that failed in a multi-process run (main's error paths)."""
  report_failure(f"{message} (exit status {status})")
  sys.stdout.flush()
  sys.stderr.flush()
  logging.flush()
  os._exit(status)  # pylint: disable=protected-access


# --- agreeing ----------------------------------------------------------------------------------


def all_succeeded(ok: bool) -> bool:
  """True when ``ok`` is True on every process (a collective: every process must call it)."""
  if not is_multiprocess():
    return bool(ok)
  import numpy as np
  from jax.experimental import multihost_utils
  flags = multihost_utils.process_allgather(np.asarray([1 if ok else 0], np.int32))
  return bool(np.all(flags))


_barrier_counts = {}


def barrier(name: str, timeout_s: float = 600):
  """Waits until every process arrives here; an error (not a hang) after ``timeout_s``."""
  if not is_multiprocess():
    return
  count = _barrier_counts[name] = _barrier_counts.get(name, 0) + 1
  _client().wait_at_barrier(f"{_PREFIX}{name}/{count}", int(timeout_s * 1000))


class _Stop:
  """Process-wide stop state: set by the signal handlers, agreed by the stop watcher."""
  lock = threading.Lock()
  signum = None        # the signal this process received
  reason = None        # e.g. "SIGTERM on process 1"
  stop_step = None     # the step after which every process stops, once agreed
  current = None       # the last step this process's loop finished (None: not started)
  handlers_installed = False


def _handle_signal(signum, frame):
  del frame
  if _Stop.signum is not None and signum == signal.SIGINT:
    raise KeyboardInterrupt  # a second Ctrl-C: stop at once
  if _Stop.signum is None:
    _Stop.signum = signum
    name = signal.Signals(signum).name
    logging.warning("%s: finishing this step, saving a checkpoint, then stopping.", name)
    if is_multiprocess():
      try:
        _client().key_value_set(_STOP_KEY, f"{name} on process {process_index()}")
      except Exception:  # pylint: disable=broad-except
        pass  # another process asked first


def install_stop_handlers():
  """SIGTERM and Ctrl-C request a stop instead of killing the process; returns the handlers
  they replace (main installs them for good right after ``initialize``, so that a signal
  during start-up or compilation is not lost; the train loop installs them for its run)."""
  old = {}
  for sig in (signal.SIGTERM, signal.SIGINT):
    try:
      old[sig] = signal.signal(sig, _handle_signal)
    except ValueError:  # not the main thread (some notebook runners): no handler
      pass
  _Stop.handlers_installed = True
  return old


def _agree_on_stop_step(client, reason):
  """Every process posts the last step its loop finished and waits for everyone's; all stop
  after the largest + 1. Holds this process's loop at its next step boundary meanwhile, so
  that no loop passes the agreed step. No device work is involved, so no deadlock."""
  with _Stop.lock:
    reached = _Stop.current if _Stop.current is not None else 0
    client.key_value_set(f"{_STOP_AT}{process_index()}", str(reached))
    steps = [int(client.blocking_key_value_get(f"{_STOP_AT}{i}", _AGREE_TIMEOUT_MS))
             for i in range(process_count())]
    _Stop.reason, _Stop.stop_step = reason, max(steps) + 1
  logging.info("Stop requested (%s): every process stops after step %d.", reason,
               _Stop.stop_step)


class StopAgreement:
  """SIGTERM (a preemption, a scheduler's time limit) or Ctrl-C on any process -> every
  process stops after the same step.

  ``should_stop(step)`` is asked by every process once per step (after dispatching it, before
  anything waits on the devices). With one process it reads the local flag. With several, a
  signalled process posts a request to the coordination service's key-value store; on every
  process a watcher thread then posts the last step its loop finished, waits for everyone's,
  and sets the stop step to the largest + 1, holding its loop at the next step boundary
  meanwhile, so no loop can pass the agreed step. The wait involves no device work, so it
  cannot deadlock on a collective. (This is the protocol of jax's preemption sync point,
  which we do not use: it counts its own calls, which orbax also makes with the training
  step, so a resumed run or a signal during compilation would never reach its sync point.)
  """

  def __init__(self, start_step: int = 0):
    self._old = {}
    with _Stop.lock:
      _Stop.current = start_step

  def __enter__(self):
    if not _Stop.handlers_installed:
      self._old = install_stop_handlers()
    return self

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)
    if self._old:
      _Stop.handlers_installed = False
    if not is_multiprocess():  # the next run in this process (tests, notebooks) starts afresh
      with _Stop.lock:
        _Stop.signum = _Stop.reason = _Stop.stop_step = _Stop.current = None

  @property
  def reason(self):
    return _Stop.reason

  @property
  def exit_status(self) -> int:
    """128 + the signal number, the shell's convention (143 for SIGTERM, 130 for Ctrl-C)."""
    if _Stop.signum is not None:
      return 128 + int(_Stop.signum)
    name = (_Stop.reason or "SIGTERM").split()[0]
    return 128 + int(signal.Signals[name].value)

  def should_stop(self, step: int) -> bool:
    with _Stop.lock:
      _Stop.current = step
      if not is_multiprocess():
        if _Stop.signum is not None and _Stop.stop_step is None:
          _Stop.stop_step = step
          _Stop.reason = f"{signal.Signals(_Stop.signum).name} on process 0"
      return _Stop.stop_step is not None and step >= _Stop.stop_step
