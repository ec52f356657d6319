"""What each dataset's evaluation knows, one registry entry per dataset (config.data.name).

An evaluator scores sample sets against its data and says how to show them:

    ev = evaluators.build(trainer, config.eval, workdir)
    ev.has_metric                  False where this data has no metric here (samples only)
    cls.metric_problem(eval_config) -> why job=evaluate cannot score ('' if it can)
    cls.check_files(eval_config)   reads the metric's files (weights, statistics) up front
    ev.metric(x, n) -> {name: value}; ev.real_floor(n) -> {name: value} or None
    ev.reference_panel() -> SampleSet of real data for the pictures, or None
    ev.picture                     'scatter' (2-D points) or 'grid' (images)
    ev.note(n) -> one paragraph for the report: what the numbers mean
    ev.title() -> the data's name in the report's heading

Entries are modules (like the data and model registries), imported on first use, so CIFAR-10
FID, MNIST-5k and GenEval each arrive as one more line here and one module.
"""

import os

from fgm_jax import paths
from fgm_jax import registry

_REGISTRY = {
    "toy2d": "fgm_jax.evaluation.toy2d_evaluator:Toy2DEvaluator",
    "digits": "fgm_jax.evaluation.digits_evaluator:DigitsEvaluator",
    "mnist5k": "fgm_jax.evaluation.mnist5k_evaluator:MNIST5kEvaluator",
    "tfds": "fgm_jax.evaluation.fid_evaluator:FIDEvaluator",
}


class Evaluator:
  """Defaults for an entry: image grids, no real-data floor or reference panel."""

  has_metric = True
  picture = "grid"
  # Why job=evaluate cannot run here, for entries without a metric.
  missing_metric = ""

  def __init__(self, trainer, eval_config, workdir):
    self.trainer, self.eval_config, self.workdir = trainer, eval_config, workdir

  @classmethod
  def metric_problem(cls, eval_config) -> str:
    del eval_config
    return "" if cls.has_metric else cls.missing_metric

  @classmethod
  def check_files(cls, eval_config) -> None:
    del eval_config

  def cache_dir(self, name: str) -> str:
    """Where derived artifacts (a feature classifier, reference statistics) are cached:
    config.eval.classifier_dir, else ``name`` beside the run's workdir (for runs/digits/fgm
    that is runs/digits/<name>, shared by the pipeline's stages)."""
    chosen = self.eval_config.classifier_dir
    return chosen or os.path.join(os.path.dirname(paths.absolute(self.workdir)), name)

  def metric(self, x, n):
    raise NotImplementedError

  def real_floor(self, n):
    del n
    return None

  def reference_panel(self):
    return None

  def note(self, n):
    del n
    return ""

  def title(self):
    return self.trainer.data_config.name


def evaluator_class(data_config):
  return registry.resolve(_REGISTRY, data_config.name, "config.data.name")


def build(trainer, eval_config, workdir) -> Evaluator:
  return evaluator_class(trainer.data_config)(trainer, eval_config, workdir)
