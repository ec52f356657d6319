"""Command-line entry point.

    python -m fgm_jax.main --config=configs/toy2d_fgm.py --workdir=runs/fgm [--config.x=y ...]

config.job picks what runs: 'teacher' or 'distill' train (resuming from --workdir);
'sample' writes samples.npz (from a run, or from an exported generator folder); 'evaluate'
writes eval.json; 'export' writes the one-step generator as a standalone folder; 'pipeline'
(distill configs) trains the teacher, distils it, evaluates both and writes a report, all
under --workdir.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorBoard writer's TF start-up noise

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, samples.")
_MULTIHOST = flags.DEFINE_bool("multihost", False,
                               "Call jax.distributed.initialize() (TPU pods, multi-node GPU).")


# config.job -> "module:function(config, workdir)", imported on use (a toy run never loads
# the evaluation or pipeline code it does not run).
RUNS = {
    "teacher": "fgm_jax.train.loop:train",
    "distill": "fgm_jax.train.loop:train",
    "pipeline": "fgm_jax.pipeline:run",
    "sample": "fgm_jax.evaluation.evaluate:sample",
    "evaluate": "fgm_jax.evaluation.evaluate:evaluate",
    "export": "fgm_jax.export:export",
    "prompt_cache": "fgm_jax.sd3.prompt_cache:write",
}


def run(config, workdir):
  from fgm_jax import config_checks
  from fgm_jax import registry
  config_checks.validate(config)
  return registry.resolve(RUNS, config.job, "config.job")(config, workdir)


class _QuietLibraries:
  """Drops orbax's per-save INFO chatter so progress lines stay readable (warnings pass)."""

  NOISY = ("/orbax/", "/jax/_src/", "replica_slices.py", "signaling_client.py")

  def filter(self, record):
    return record.levelno >= 30 or not any(p in record.pathname for p in self.NOISY)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if _MULTIHOST.value:
    import jax
    jax.distributed.initialize()
  from fgm_jax import config_checks
  from fgm_jax import workdir_lock
  from fgm_jax.convert import common as convert_common
  try:
    run(_CONFIG.value, _WORKDIR.value)
  except (config_checks.ConfigError, FileNotFoundError, workdir_lock.WorkdirLockedError,
          convert_common.ConversionError) as e:
    # A user error (bad config value, missing checkpoint, dataset or weights file, a weight
    # file of the wrong architecture or shapes, a workdir another run writes to), not a bug:
    # one clear message, no traceback. CheckpointNotFoundError and the data sources'
    # DatasetNotFoundError are FileNotFoundErrors. Printed once (absl's log also goes to
    # stderr, so logging it as well would show it twice).
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
