"""Toy 2-D data: exact sample distances to fresh draws of the distribution."""

from fgm_jax.evaluation import evaluators
from fgm_jax.evaluation import plots
from fgm_jax.evaluation import toy_metrics
from fgm_jax.train import sampling

FLOOR_SEED = 54321  # the real-data floor's second draw, independent of the reference draw


class Toy2DEvaluator(evaluators.Evaluator):
  picture = "scatter"

  def metric(self, x, n):
    ref = self.trainer.data.reference(n)
    return {"energy_distance": toy_metrics.energy_distance(x, ref),
            "sliced_w2": toy_metrics.sliced_wasserstein2(x, ref)}

  def real_floor(self, n):
    """A second independent draw of n fresh points: what a perfect generator scores."""
    return self.metric(self.trainer.data.reference(n, seed=FLOOR_SEED), n)

  def reference_panel(self):
    return sampling.SampleSet("data", "data", self.trainer.data.reference(plots.SCATTER_POINTS))

  def note(self, n):
    return (f"Energy distance and sliced Wasserstein-2 (lower is better) between {n} samples "
            f"and {n} fresh data points; 'real data' is a second fresh draw.")

  def title(self):
    return f"toy2d ({self.trainer.data_config.distribution})"
