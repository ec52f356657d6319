"""8x8 digits: Fréchet distance in a small classifier's features, against held-out digits."""

from fgm_jax.evaluation import digits_classifier
from fgm_jax.evaluation import evaluators
from fgm_jax.evaluation import plots
from fgm_jax.train import sampling


class DigitsEvaluator(evaluators.Evaluator):

  @property
  def classifier_dir(self):
    return self.cache_dir("digits_classifier")

  def metric(self, x, n):
    del n
    return {"fd": digits_classifier.digits_fd(x, self.classifier_dir)}

  def real_floor(self, n):
    """The 1,500 train digits vs the 297 held-out ones (so evaluate 1,500 samples to compare)."""
    del n
    return {"fd": digits_classifier.real_floor(self.classifier_dir)}

  def reference_panel(self):
    from fgm_jax.data import digits
    images = digits.load_split("test")[0][:plots.GRID_IMAGES]
    return sampling.SampleSet("real_heldout", "real (held-out)", images)

  def note(self, n):
    return (f"Fréchet distance (lower is better) in the feature space of a small CNN trained on "
            f"the digits train split, between {n} samples and the 297 held-out digits. "
            "'real data' is the 1,500 train digits against the same held-out set: roughly the "
            "best a generator can score with this many samples.")
