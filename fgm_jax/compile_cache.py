"""jax's persistent compilation cache for training runs: compile once per slice, not per restart.

A preempted pod job that restarts, or a second job of the same shape, loads its programs from
``config.compilation_cache.dir`` (default <workdir>/compilation_cache) instead of compiling
them again (minutes at SD3 or CIFAR-10 scale). jax keys every entry on the program, the
devices, the compiler version and flags, so a changed config or jax simply compiles afresh.

A cache directory already configured by the user (JAX_COMPILATION_CACHE_DIR, or
jax.config's jax_compilation_cache_dir) is left as it is. The cache holds executables: keep it
where only you can write (jax's warning: whoever writes to it can run code in your job).
"""

import collections
import contextlib
import os

import jax
from absl import logging
from jax import monitoring

HIT = "/jax/compilation_cache/cache_hits"
WRITE = "/jax/compilation_cache/cache_misses"  # jax records it when it writes a new entry
COMPILE_SECONDS = "/jax/core/compile/backend_compile_duration"  # XLA compiling (or loading)
SAVED_SECONDS = "/jax/compilation_cache/compile_time_saved_sec"
_KEYS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")


def directory(config, workdir) -> str:
  return config.compilation_cache.dir or os.path.join(workdir, "compilation_cache")


@contextlib.contextmanager
def counting():
  """Yields a Counter while open: cache hits ('loaded'), new entries ('compiled'), seconds
  in XLA's compile calls ('compile_s', loads included) and compile time saved by the cache
  ('saved_s')."""
  counts = collections.Counter()

  def listener(event, **_):
    if event == HIT:
      counts["loaded"] += 1
    elif event == WRITE:
      counts["compiled"] += 1

  def durations(event, seconds, **_):
    if event == COMPILE_SECONDS:
      counts["compile_s"] += seconds
    elif event == SAVED_SECONDS:
      counts["saved_s"] += seconds

  monitoring.register_event_listener(listener)
  monitoring.register_event_duration_secs_listener(durations)
  try:
    yield counts
  finally:
    monitoring.unregister_event_listener(listener)
    monitoring.unregister_event_duration_listener(durations)


@contextlib.contextmanager
def persistent(path: str):
  """jax's persistent cache in ``path`` (every program, however quick to compile), restoring
  the previous settings afterwards."""
  from jax._src import compilation_cache as cc  # reset_cache: take the new directory now
  old = {k: getattr(jax.config, k) for k in _KEYS}
  jax.config.update(_KEYS[0], str(path))
  jax.config.update(_KEYS[1], 0)
  cc.reset_cache()
  try:
    yield
  finally:
    for k, v in old.items():
      jax.config.update(k, v)
    cc.reset_cache()


@contextlib.contextmanager
def for_run(config, workdir):
  """The run's cache (unless config.compilation_cache.enabled=False or the user set one);
  logs at the end how many programs were loaded and how many compiled."""
  own = config.compilation_cache.enabled and not jax.config.jax_compilation_cache_dir
  scope = persistent(directory(config, workdir)) if own else contextlib.nullcontext()
  with scope, counting() as counts:
    yield counts
    if jax.config.jax_compilation_cache_dir:
      logging.info("compilation cache %s: %d programs loaded, %d compiled and saved; %.1f s "
                   "in XLA compile calls, %.1f s saved.", jax.config.jax_compilation_cache_dir,
                   counts["loaded"], counts["compiled"], counts["compile_s"], counts["saved_s"])
