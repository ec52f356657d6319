"""orbax CheckpointManager wrappers: one manager per run, state + JSON metadata per step.

A checkpoint is only visible once orbax has finalised it (it writes to a temporary folder and
renames), so a run killed mid-save resumes from the previous complete step. A complete step
can still be damaged afterwards (a truncated copy to or from a bucket): ``read`` then raises
``CheckpointCorruptError``, one line with the step, the path and the cause, and
``set_aside`` moves such a step to ``checkpoints/corrupt-<step>``, where orbax no longer sees
it. Reads involve no cross-process barrier, so in a multi-process run every process can try
a step and the processes then agree on the outcome (train/loop.py).
"""

import dataclasses
import functools
import os
import sys
from typing import Optional

import jax
import orbax.checkpoint as ocp
from etils import epath

from fgm_jax import paths  # local paths and gs:// buckets alike (TPU pods)


class CheckpointNotFoundError(FileNotFoundError):
  pass


class CheckpointCorruptError(RuntimeError):
  """A checkpoint whose files cannot be read; says which step, where, and why."""

  def __init__(self, step: int, path: str, cause: str):
    self.step, self.path, self.cause = step, path, cause
    folder = os.path.dirname(path.rstrip("/"))
    super().__init__(
        f"checkpoint step {step} at {path} cannot be read ({cause}). It is not replaced by an "
        f"older one silently: rerun training with this --workdir (it sets a damaged "
        f"checkpoint aside and resumes from the previous one), or move it aside yourself "
        f"(mv {path} {folder}/corrupt-{step}) to use the previous checkpoint.")


class CheckpointMismatchError(ValueError):
  """A readable checkpoint whose arrays have other shapes than this code builds."""


def manager(directory: str, *, every: int = 1, keep: int = 3,
            async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, save_interval_steps=every, enable_async_checkpointing=async_save,
      create=True)
  return ocp.CheckpointManager(as_path(directory), options=options)


def save(mgr: ocp.CheckpointManager, step: int, state, meta: dict, force: bool = False):
  """Saves asynchronously when ``step`` is on the manager's interval (or when forced)."""
  return mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                meta=ocp.args.JsonSave(meta)), force=force)


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying the target shardings, for a sharded restore."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_tree, shardings)


def restore(mgr: ocp.CheckpointManager, step: int, abstract_state):
  """(state, meta) of ``step``, placed as ``abstract_state``'s shardings say."""
  return read(str(mgr.directory), step, abstract_state)


def step_path(directory: str, step: int) -> epath.Path:
  return as_path(directory) / str(int(step))


def read(directory: str, step: int, abstract_state):
  """(state, meta) of ``step`` in ``directory``, read by this process alone.

  Raises CheckpointCorruptError when the files cannot be read, CheckpointMismatchError when
  they hold arrays of other shapes (a code change, not damage: nothing should be moved).
  """
  path = step_path(directory, step)
  _drop_closed_loop_noise()
  try:
    state = _restore_state(path / "state", abstract_state)
    meta = _read_json(path)
  except Exception as e:  # pylint: disable=broad-except
    if _layout_differs(path / "state", abstract_state):
      raise CheckpointMismatchError(
          f"checkpoint step {step} at {path} holds arrays of other shapes than this code "
          "builds for this config (was the model code changed?). Nothing was moved; use a "
          "new --workdir, or the code version that wrote it.") from None
    raise CheckpointCorruptError(step, str(path), _root_cause(e)) from e
  return state, meta


def _restore_state(state_dir, abstract_state):
  """The whole state. One saved before a field was added that holds nothing here (e.g.
  FGMState.gen_extra_emas of a run without extra EMAs) is read as it was saved, the field
  keeping its empty value."""
  if not _lacks_empty_fields(state_dir, abstract_state):
    return _handler("state").restore(state_dir, args=ocp.args.StandardRestore(abstract_state))
  args = ocp.args.PyTreeRestore(
      item=abstract_state,
      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
      partial_restore=True)
  return _handler("branches").restore(state_dir, args=args)


def _lacks_empty_fields(state_dir, abstract_state) -> bool:
  """True when the saved state lacks fields of the ``abstract_state`` dataclass, all of them
  without arrays; False otherwise (an unreadable tree included: the restore says why)."""
  if not dataclasses.is_dataclass(abstract_state):
    return False
  try:
    saved = _handler("state").metadata(state_dir).tree
  except Exception:  # pylint: disable=broad-except
    return False
  absent = [f.name for f in dataclasses.fields(abstract_state) if f.name not in saved]
  return bool(absent) and not any(jax.tree.leaves(getattr(abstract_state, name))
                                  for name in absent)


def saved_tree(directory: str, step: int) -> dict:
  """The saved state's structure as nested dicts of array metadata (no array is read)."""
  path = step_path(directory, step)
  try:
    return _handler("state").metadata(path / "state").tree
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointCorruptError(step, str(path), _root_cause(e)) from e


def read_branches(directory: str, step: int, target: dict) -> dict:
  """Only the branches of the saved state that ``target`` names ({field: abstract tree with
  shardings}, nested dicts for deeper branches), placed as their shardings say. orbax's
  partial restore: the other arrays' chunks are never read (an FGM checkpoint holds seven
  generator-sized trees; job=sample needs one)."""
  path = step_path(directory, step)
  _drop_closed_loop_noise()
  args = ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True)
  try:
    return _handler("branches").restore(path / "state", args=args)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointCorruptError(step, str(path), _root_cause(e)) from e


def _read_json(step_dir) -> dict:
  return _handler("meta").restore(step_dir / "meta", args=ocp.args.JsonRestore())


@functools.lru_cache(maxsize=None)
def _handler(item: str):
  """One orbax handler per item kind for the whole process: closing one after a failed read
  leaves TensorStore callbacks aimed at a closed event loop."""
  if item == "branches":  # partial restores of a state saved by the "state" handler
    return ocp.PyTreeCheckpointHandler()
  return ocp.StandardCheckpointHandler() if item == "state" else ocp.JsonCheckpointHandler()


def _drop_closed_loop_noise():
  """orbax reads the arrays in an asyncio loop that it closes at the first failed array;
  TensorStore then reports every other array into the closed loop, which Python prints as
  ~100 'Event loop is closed' tracebacks for one damaged checkpoint. They say nothing the
  one CheckpointCorruptError line does not, so that exact error is dropped (once installed,
  for the process; every other unraisable error still goes to the previous hook)."""
  if getattr(sys.unraisablehook, "drops_closed_loop_noise", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
      return
    previous(unraisable)

  hook.drops_closed_loop_noise = True
  sys.unraisablehook = hook


def _root_cause(error: BaseException) -> str:
  """The first line of the innermost error (orbax wraps TensorStore's in generic ones)."""
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  text = (str(error).strip().splitlines() or [type(error).__name__])[0]
  return text if len(text) <= 240 else text[:237] + "..."


def _layout_differs(state_dir, abstract_state) -> bool:
  """True when the saved arrays' shapes differ from ``abstract_state``'s; False when they
  match or when the saved metadata is unreadable (damage, not a different layout)."""
  try:
    saved = _handler("state").metadata(state_dir)
  except Exception:  # pylint: disable=broad-except
    return False
  shapes = lambda tree: sorted(tuple(getattr(x, "shape", ())) for x in jax.tree.leaves(tree))
  return shapes(saved) != shapes(abstract_state)


def read_meta(directory: str, step: Optional[int] = None) -> dict:
  """The JSON metadata of a checkpoint without restoring its arrays."""
  step = latest_step(directory) if step is None else step
  if step is None:
    raise CheckpointNotFoundError(f"no complete checkpoint in {directory}.")
  path = step_path(directory, step)
  try:
    return _read_json(path)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointCorruptError(step, str(path), _root_cause(e)) from e


def set_aside(directory: str, step: int) -> str:
  """Moves a damaged step to ``<directory>/corrupt-<step>`` (kept for inspection; orbax
  ignores it); returns the new path."""
  target = as_path(directory) / f"corrupt-{step}"
  k = 2
  while target.exists():
    target = as_path(directory) / f"corrupt-{step}-{k}"
    k += 1
  step_path(directory, step).rename(target)
  return str(target)


def as_path(directory: str) -> epath.Path:
  return paths.path(directory)


def checkpoint_dir(workdir: str) -> str:
  return str(as_path(workdir) / "checkpoints")


def steps(directory: str) -> list:
  """The complete steps in ``directory``, oldest first ([] when there is none)."""
  if not as_path(directory).is_dir():
    return []
  return sorted(ocp.CheckpointManager(as_path(directory)).all_steps())


def latest_step(directory: str) -> Optional[int]:
  if not as_path(directory).is_dir():
    return None
  return ocp.CheckpointManager(as_path(directory)).latest_step()


def write_json(path: str, obj: dict):
  paths.write_json(path, obj)  # whole or not at all, on a disk or in a bucket
