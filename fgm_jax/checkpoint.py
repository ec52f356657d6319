"""orbax CheckpointManager wrappers: one manager per run, state + JSON metadata per step.

A checkpoint is only visible once orbax has finalised it (it writes to a temporary folder and
renames), so a run killed mid-save resumes from the previous complete step.
"""

import json
import os
from typing import Optional

import jax
import orbax.checkpoint as ocp
from etils import epath  # local paths and gs:// buckets alike (TPU pods)


class CheckpointNotFoundError(FileNotFoundError):
  pass


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
  restored = mgr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
  return restored["state"], restored["meta"]


def read_meta(directory: str, step: Optional[int] = None) -> dict:
  """The JSON metadata of a checkpoint without restoring its arrays."""
  mgr = ocp.CheckpointManager(as_path(directory))
  step = mgr.latest_step() if step is None else step
  if step is None:
    raise CheckpointNotFoundError(f"no complete checkpoint in {directory}.")
  return mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def as_path(directory: str) -> epath.Path:
  if "://" in str(directory):
    return epath.Path(directory)
  return epath.Path(os.path.abspath(directory))


def checkpoint_dir(workdir: str) -> str:
  return str(as_path(workdir) / "checkpoints")


def latest_step(directory: str) -> Optional[int]:
  if not as_path(directory).is_dir():
    return None
  return ocp.CheckpointManager(as_path(directory)).latest_step()


def write_json(path: str, obj: dict):
  path = as_path(path)
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
  tmp.replace(path)  # atomic on local disks: a crash never leaves half a file
