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
