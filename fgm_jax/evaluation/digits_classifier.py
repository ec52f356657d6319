"""The digits metric: Fréchet distance in the feature space of a small digits classifier.

FID's idea at the scale of scikit-learn's 8x8 digits (fgm_jax/evaluation/feature_classifier.py
holds the shared network, training and caching): a CNN trained on the digits TRAIN split
(never the held-out one) embeds images; generated samples are compared with the held-out
digits by the Fréchet distance between Gaussians fitted to those embeddings.

    params = load_or_train(cache_dir)       # trains once (seconds), then reads the cache
    digits_fd(samples, cache_dir)           # samples: (N, 8, 8, 1) in [-1, 1]
    real_floor(cache_dir)                   # FD(train, held-out): what real data scores

The classifier is cached as `<cache_dir>/digits_classifier.safetensors`; training is
deterministic for a given seed.
"""

from fgm_jax.data import digits
from fgm_jax.evaluation import feature_classifier as fc

# Two conv stages on 8x8 and 4x4 grids (32, 32 | 64 channels), a 64-dim embedding; 30 epochs
# of batch 50 at lr 2e-3 with one-pixel shifts. Changing any of these moves every digits FD
# (experiments/results/digits.md).
SPEC = fc.Spec(name="digits", shape=digits.SHAPE, stages=((32, 32), (64,)),
               load_split=digits.load_split, feature_dim=64, epochs=30, batch_size=50,
               learning_rate=2e-3, max_shift=1)
CACHE_NAME = SPEC.cache_name
FEATURE_DIM = SPEC.feature_dim


def features(params, images):
  """Penultimate-layer embeddings (pre-activation), float32 (N, FEATURE_DIM)."""
  return fc.features(SPEC, params, images)


def accuracy(params, images, labels) -> float:
  return fc.accuracy(SPEC, params, images, labels)


def train(seed: int = 0, log=print):
  """Trains on the digits train split; returns (variables, held-out accuracy)."""
  return fc.train(SPEC, seed=seed, log=log)


def load_or_train(cache_dir: str, seed: int = 0, log=print):
  """Cached classifier variables, training (and caching) them first if the file is absent."""
  return fc.load_or_train(SPEC, cache_dir, seed=seed, log=log)


def fd_to_split(params, images, split: str = "test") -> float:
  return fc.fd_to_split(SPEC, params, images, split)


def digits_fd(images, cache_dir: str) -> float:
  """FD between the images' features and the held-out real digits' features."""
  return fc.fd_to_split(SPEC, load_or_train(cache_dir), images, "test")


def real_floor(cache_dir: str) -> float:
  """FD between the train and held-out splits: roughly the best a generator can score."""
  return fc.real_floor(SPEC, cache_dir)
