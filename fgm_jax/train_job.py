"""job=train and job=train: the training loop with the evaluation hooks the config asks for.

Sits above both train/ and evaluation/ so neither imports the other: the loop takes its
per-step hooks as an argument (train/loop.py), and this is where they are chosen
(evaluation/training_hooks.py: sample pictures, training FID). main.py and the pipeline run
training through here.
"""

from fgm_jax.evaluation import training_hooks
from fgm_jax.train import loop


def run(config, workdir, *, mesh=None):
  """Trains (or resumes) ``config`` in ``workdir``; returns (trainer, final state)."""
  return loop.train(config, workdir, mesh=mesh, hooks=training_hooks.for_run)
