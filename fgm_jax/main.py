"""Command-line entry point.

    python -m fgm_jax.main --config=configs/toy2d_fgm.py --workdir=runs/fgm [--config.x=y ...]

config.job picks what runs: 'train' trains the run config.trainer declares (a teacher, or
FGM of a teacher), resuming from --workdir;
'sample' writes samples.npz (from a run, or from an exported generator folder); 'evaluate'
writes eval.json; 'export' writes the one-step generator as a standalone folder; 'pipeline'
(FGM configs) trains the teacher, distils it, evaluates both and writes a report, all
under --workdir; 'compile' compiles the run's functions ahead of time, for this machine or a
TPU topology (--config.aot.topology=v5p:2x2x1), and reports memory per chip (fgm_jax/aot.py).

Multi-process runs (TPU pod slices, GPU clusters; every host runs the same command) connect
first: --coordinator_address/--num_processes/--process_id (or JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID), or --multihost to let jax read TPU / SLURM / Open MPI /
k8s settings; without either this is a one-process run.

Exit status: 0 done; 1 a crash, or another process of the run failed (named on stderr);
2 a problem with the inputs (config, files, workdir lock, an unreadable checkpoint), one
line; 3 training diverged, one line naming the newest (finite) checkpoint; 143 (130 for
Ctrl-C) stopped by SIGTERM after saving a checkpoint: rerun the same command to resume.
"""

import os
import sys
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorBoard writer's TF start-up noise

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, samples.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Multi-process run whose peers jax finds by itself (TPU pod slices, "
    "SLURM, Open MPI, k8s): calls jax.distributed.initialize() before anything else.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 of a multi-process run (default "
    "$JAX_COORDINATOR_ADDRESS); needs --num_processes and --process_id too.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in the run (default $JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index, 0 .. num_processes-1 (default $JAX_PROCESS_ID).")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout", 100, "Multi-process runs: seconds without a heartbeat after which a "
    "process counts as dead (killed, host lost) and the others stop.")
_INIT_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout", 300, "Multi-process runs: seconds to wait for every process to "
    "connect.")


# config.job -> "module:function(config, workdir)", imported on use (a toy run never loads
# the evaluation or pipeline code it does not run).
RUNS = {
    "train": "fgm_jax.train_job:run",
    "pipeline": "fgm_jax.pipeline:run",
    "sample": "fgm_jax.evaluation.evaluate:sample",
    "evaluate": "fgm_jax.evaluation.evaluate:evaluate",
    "export": "fgm_jax.export:export",
    "prompt_cache": "fgm_jax.sd3.prompt_cache:write",
    "compile": "fgm_jax.aot:run",
}


def run(config, workdir):
  from fgm_jax import config_checks
  from fgm_jax.train import kinds
  config_checks.validate(config)
  return kinds.job_function(config.trainer, config.job, RUNS)(config, workdir)


class _QuietLibraries:
  """Drops orbax's per-save INFO chatter so progress lines stay readable (warnings pass)."""

  NOISY = ("/orbax/", "/jax/_src/", "replica_slices.py", "signaling_client.py")

  def filter(self, record):
    return record.levelno >= 30 or not any(p in record.pathname for p in self.NOISY)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  from fgm_jax import distributed
  try:
    multiprocess = distributed.initialize(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, auto=_MULTIHOST.value,
        heartbeat_timeout_s=_HEARTBEAT.value, initialization_timeout_s=_INIT_TIMEOUT.value)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(distributed.EXIT_USAGE)
  if multiprocess:
    distributed.install_stop_handlers()  # a SIGTERM during start-up still stops cleanly
  _tune_host_allocator()
  status, message = run_with_status(_CONFIG.value, _WORKDIR.value)
  if multiprocess and status not in (0, 130, 143):
    # The others may wait in a collective for this process forever: tell them and leave
    # without jax's shutdown barrier.
    distributed.exit_after_failure(status, message)
  distributed.closing()
  sys.exit(status)


def _tune_host_allocator():
  """CPU-backend runs reuse freed host memory instead of page-faulting each step's XLA
  temporaries in again (fgm_jax/host_memory.py; results unchanged, the digits teacher step
  about 9 % faster)."""
  import jax
  from fgm_jax import host_memory
  if jax.default_backend() == "cpu":
    host_memory.reuse_freed_memory()


def run_with_status(config, workdir):
  """Runs the job; returns (exit status, one-line error or ''), after printing the error."""
  from fgm_jax import checkpoint
  from fgm_jax import config_checks
  from fgm_jax import distributed
  from fgm_jax import workdir_lock
  from fgm_jax.convert import common as convert_common
  from fgm_jax.train import loop
  try:
    run(config, workdir)
    return 0, ""
  except (config_checks.ConfigError, FileNotFoundError, workdir_lock.WorkdirLockedError,
          convert_common.ConversionError, checkpoint.CheckpointCorruptError,
          checkpoint.CheckpointMismatchError) as e:
    # A user error (bad config value, missing checkpoint, dataset or weights file, a weight
    # file of the wrong architecture or shapes, a workdir another run writes to, a damaged
    # checkpoint that sample/evaluate will not replace by an older one), not a bug: one clear
    # message, no traceback. CheckpointNotFoundError and the data sources'
    # DatasetNotFoundError are FileNotFoundErrors. Printed once (absl's log also goes to
    # stderr, so logging it as well would show it twice).
    print(f"error: {e}", file=sys.stderr)
    return distributed.EXIT_USAGE, str(e).splitlines()[0]
  except loop.TrainingDiverged as e:
    print(f"error: {e}", file=sys.stderr)
    return distributed.EXIT_DIVERGED, str(e)
  except loop.TrainingStopped as e:
    print(e, file=sys.stderr)
    return e.exit_status, str(e)
  except KeyboardInterrupt:  # a second Ctrl-C
    print("interrupted", file=sys.stderr)
    return 130, "interrupted"
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc()
    return distributed.EXIT_ERROR, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
