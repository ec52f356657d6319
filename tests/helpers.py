"""Small configs shared by the tests (tiny models, few steps)."""

import contextlib
import os

from configs import toy2d_fgm  # the repository root is on sys.path (pyproject's pytest
from configs import toy2d_teacher  # pythonpath), as it is for `python -m` from the root

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_teacher_config(num_steps=40, every=10):
  c = toy2d_teacher.get_config("8gaussians")
  c.model.hidden = 32
  c.model.depth = 2
  c.batch_size = 64
  c.num_steps = num_steps
  c.checkpoint.every = every
  c.log.every = 10
  c.log.plot_every = 0
  c.optim.warmup_steps = 5
  return c


def tiny_fgm_config(teacher_workdir, num_steps=20, every=10):
  c = toy2d_fgm.get_config("8gaussians")
  t = tiny_teacher_config()
  c.teacher.model = t.model
  c.teacher.workdir = teacher_workdir
  c.batch_size = 64
  c.num_steps = num_steps
  c.checkpoint.every = every
  c.log.every = 10
  c.log.plot_every = 0
  c.optim.lr = 1e-3
  c.online_optim.lr = 1e-3
  return c


def tiny_pipeline_config(teacher_steps, teacher_every, fgm_steps, num_samples):
  """job=pipeline on the tiny toy configs: the teacher stage trains with tiny_teacher_config's
  settings, the FGM stage with tiny_fgm_config's."""
  c = tiny_fgm_config("set-by-the-pipeline", num_steps=fgm_steps, every=10)
  teacher = tiny_teacher_config(num_steps=teacher_steps, every=teacher_every)
  with c.teacher.unlocked():
    c.teacher.num_steps = teacher.num_steps
    c.teacher.batch_size = teacher.batch_size
    c.teacher.checkpoint = teacher.checkpoint
    c.teacher.log = teacher.log
  c.job = "pipeline"
  c.eval.num_samples = num_samples
  return c


def overrides(config, prefix="--config."):
  """Command-line overrides reproducing ``config``'s leaves."""
  out = []
  for key, value in _flatten(config.to_dict()):
    if isinstance(value, (list, tuple)) or value is None:
      continue
    out.append(f"{prefix}{key}={value}")
  return out


def _flatten(d, prefix=""):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _flatten(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


@contextlib.contextmanager
def compilation_cache(directory):
  """Turns on JAX's persistent compilation cache in ``directory`` (every program cached).

  Each trainer, job or loaded model jits fresh functions, so a test module that runs the same
  network several times compiles the same XLA program again and again; on 2 loaded cores that
  is most of its time. With the cache an identical program (same HLO, devices and flags)
  compiles once. Tracing still happens, so trace counts and numerics are unchanged.
  Subprocesses reuse it through ``compilation_cache_env(directory)``.
  """
  from fgm_jax import compile_cache  # imports jax: only once a test asks for the cache
  with compile_cache.persistent(directory):
    yield


def compilation_cache_env(directory):
  """Environment variables giving a subprocess the same persistent compilation cache."""
  return {"JAX_COMPILATION_CACHE_DIR": str(directory),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def worker_cache_dir(tmp_path_factory):
  """One compilation-cache folder per pytest(-xdist) worker, shared by its modules."""
  path = tmp_path_factory.getbasetemp() / "xla_cache"
  path.mkdir(exist_ok=True)
  return path


def complete_steps(ckpt_dir):
  """The complete checkpoint steps in a local ``ckpt_dir`` (orbax writes a step under a
  temporary name and renames it when done, so a digits-only folder is a finished one)."""
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())


def checkpointed(ckpt_dir, min_step=1):
  """A ``ready`` for run_and_kill: ``ckpt_dir`` holds a complete checkpoint >= min_step."""
  return lambda: max(complete_steps(ckpt_dir), default=-1) >= min_step


def run_and_kill(cmd, env, ready, timeout=300, poll=0.02):
  """Starts ``cmd`` in the repository root with ``env`` and SIGKILLs it the moment
  ``ready()`` holds (a real kill, mid-run: nothing is flushed or closed). Fails with the
  tail of the run's stderr if the run ends first, or if ``ready`` does not hold within
  ``timeout`` seconds; ``ready`` is asked every ``poll`` seconds."""
  import signal
  import subprocess
  import tempfile
  import time
  with tempfile.TemporaryFile() as stderr:  # a file, not a pipe: a full pipe would stall
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.time() + timeout
    try:
      while not ready():
        if proc.poll() is not None:
          stderr.seek(0)
          raise AssertionError("the run ended before it could be killed:\n"
                               + stderr.read().decode(errors="replace")[-2000:])
        assert time.time() < deadline, f"the run was not ready to kill within {timeout} s"
        time.sleep(poll)
      proc.send_signal(signal.SIGKILL)
    finally:
      proc.kill()
      proc.wait()
