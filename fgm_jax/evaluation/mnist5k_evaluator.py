"""MNIST-5k: Fréchet distance in a small classifier's features, against the held-out digits.

The classifier (fgm_jax/evaluation/feature_classifier.py, SPEC below) is trained once on the
4,500 train images and cached as <cache_dir>/mnist5k_classifier.safetensors (about a minute on
2 CPU cores; 98.8 % held-out accuracy). It reads 32x32 images: 28x28 samples (data.pad_to=28)
are centred in a 32x32 background (-1) first, so runs at either size are scored alike.

    mnist5k_fd(samples, cache_dir)            # samples: (N, 28|32, 28|32, 1) in [-1, 1]
    real_floor(cache_dir, n)                  # n train images vs the 500 held-out ones
    real_fd_noise(cache_dir, n, draws=5)      # the FD's spread over draws of n real images

The FD of N samples against the fixed 500 held-out images carries a bias that shrinks with N
(real train images score about 11.6 at N=500, 7.3 at 1,000, 5.8 at 2,000, 5.1 at 4,500), so
compare sets only at the same N; the evaluator's floor uses N train images for that reason.
experiments/mnist5k_fd_noise.py measures the spread of a trained sampler's FD over seeds.
"""

import functools

import numpy as np

from fgm_jax.data import mnist5k
from fgm_jax.evaluation import evaluators
from fgm_jax.evaluation import feature_classifier as fc
from fgm_jax.evaluation import plots
from fgm_jax.train import sampling

CLASSIFIER_SIZE = 32
# Three 3x3 conv stages at 32, 16 and 8 pixels (16 | 32 | 64 channels), a 64-dim embedding;
# 15 epochs of batch 50 at lr 2e-3 with shifts of up to 2 pixels. One conv per stage: a
# second one at 32x32 costs 3x the training time for no held-out accuracy (98.8 % both).
SPEC = fc.Spec(name="mnist5k", shape=(CLASSIFIER_SIZE, CLASSIFIER_SIZE, 1),
               stages=((16,), (32,), (64,)),
               load_split=functools.partial(mnist5k.load_split, size=CLASSIFIER_SIZE),
               feature_dim=64, epochs=15, batch_size=50, learning_rate=2e-3, max_shift=2)
# Which train images stand in for "n real samples" in the floor and its noise.
_REAL_DRAW_SEED = 7


def to_classifier_input(images) -> np.ndarray:
  """(N, 32, 32, 1) float32: 28x28 images centred in background -1, channel axis restored."""
  x = np.asarray(images, dtype=np.float32)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim == 4 and x.shape[1:3] == (mnist5k.SIZE, mnist5k.SIZE):
    x = mnist5k.pad(x, CLASSIFIER_SIZE, value=-1.0)
  return fc.prepare(SPEC, x)  # checks the shape, clips to [-1, 1]


def load_or_train(cache_dir: str, log=print):
  return fc.load_or_train(SPEC, cache_dir, log=log)


def mnist5k_fd(images, cache_dir: str) -> float:
  """FD between the images' features and the 500 held-out images' features."""
  return fc.fd_to_split(SPEC, load_or_train(cache_dir), to_classifier_input(images), "test")


def real_images(n: int, seed: int = _REAL_DRAW_SEED) -> np.ndarray:
  """n train images (all 4,500 when n >= 4,500), picked without replacement by ``seed``."""
  train = SPEC.load_split("train")[0]
  if n >= len(train):
    return train
  return train[np.sort(np.random.default_rng(seed).choice(len(train), n, replace=False))]


def real_floor(cache_dir: str, n: int = mnist5k.NUM_TRAIN) -> float:
  """FD of n real train images against the held-out ones: about the best n samples score."""
  return mnist5k_fd(real_images(n), cache_dir)


def real_fd_noise(cache_dir: str, n: int, draws: int = 5) -> dict:
  """FD of ``draws`` different sets of n train images: {'fds', 'mean', 'std'}.

  The sets overlap (drawn from 4,500), so for n near 4,500 this understates the spread of
  independent draws; experiments/mnist5k_fd_noise.py measures a sampler's own spread.
  """
  return fc.fd_spread(SPEC, cache_dir, lambda seed: real_images(n, seed),
                      range(_REAL_DRAW_SEED + 1, _REAL_DRAW_SEED + 1 + draws))


class MNIST5kEvaluator(evaluators.Evaluator):

  @property
  def classifier_dir(self):
    return self.cache_dir("mnist5k_classifier")

  def metric(self, x, n):
    del n
    return {"fd": mnist5k_fd(x, self.classifier_dir)}

  def real_floor(self, n):
    """n train images vs the 500 held-out ones (the same n as the samples: FD's bias depends
    on it)."""
    return {"fd": real_floor(self.classifier_dir, n)}

  def reference_panel(self):
    size = self.trainer.shape[0]
    images = mnist5k.load_split("test", size)[0]
    # The split is in file order (grouped by digit): a fixed shuffle shows every class.
    images = images[np.random.default_rng(0).permutation(len(images))[:plots.GRID_IMAGES]]
    return sampling.SampleSet("real_heldout", "real (held-out)", images)

  def note(self, n):
    floor_n = min(n, mnist5k.NUM_TRAIN)
    return (f"Fréchet distance (lower is better) in the 64-dim feature space of a small CNN "
            f"trained on the 4,500 MNIST-5k train images, between {n} samples and the 500 "
            f"held-out images (50 per digit). 'real data' is {floor_n} train images against "
            "the same held-out set: about the best a generator can score with this many "
            "samples (the FD's bias grows as N shrinks, so compare rows only at the same N).")

  def title(self):
    return "MNIST-5k"
