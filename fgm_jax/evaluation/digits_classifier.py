"""The digits metric: Fréchet distance in the feature space of a small digits classifier.

FID's idea at the scale of scikit-learn's 8x8 digits: a CNN trained on the digits TRAIN
split (never the held-out one) embeds images; generated samples are compared with the
held-out digits by the Fréchet distance between Gaussians fitted to those embeddings.

    params = load_or_train(cache_dir)       # trains once (seconds), then reads the cache
    digits_fd(samples, cache_dir)           # samples: (N, 8, 8, 1) in [-1, 1]
    real_floor(cache_dir)                   # FD(train, held-out): what real data scores

The classifier is cached as `<cache_dir>/digits_classifier.safetensors`; training is
deterministic for a given seed.
"""

import os
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors.numpy
from flax import traverse_util

from fgm_jax.data import digits
from fgm_jax.evaluation import frechet

CACHE_NAME = "digits_classifier.safetensors"
FEATURE_DIM = 64
NUM_CLASSES = 10
_FORMAT = "fgm_jax.digits_classifier/1"
_EVAL_CHUNK = 512


class DigitsCNN(nn.Module):
  """Two conv stages on 8x8 and 4x4 grids, then a FEATURE_DIM embedding and logits."""
  feature_dim: int = FEATURE_DIM

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(nn.Conv(64, (3, 3))(x))
    x = x.reshape(x.shape[0], -1)
    # Features are taken before the ReLU: no dead (constant) dimensions, so the fitted
    # covariances stay full rank.
    feats = nn.Dense(self.feature_dim)(x)
    return nn.Dense(NUM_CLASSES)(nn.relu(feats)), feats


def _model():
  return DigitsCNN()


def _abstract_variables():
  return jax.eval_shape(_model().init, jax.random.PRNGKey(0), jnp.zeros((1,) + digits.SHAPE))


@jax.jit
def _apply(variables, x):
  return _model().apply(variables, x)


def _prepare(images) -> np.ndarray:
  """Clips to [-1, 1] (generators overshoot) and restores the channel axis if dropped."""
  x = np.asarray(images, dtype=np.float32)
  if x.shape[1:] == digits.SHAPE[:2]:
    x = x[..., None]
  if x.shape[1:] != digits.SHAPE:
    raise ValueError(f"digits images must be (N, 8, 8, 1), got {x.shape}.")
  return np.clip(x, -1.0, 1.0)


def _forward(variables, images):
  """(logits, features) for any number of images, in fixed-size chunks (one compile)."""
  x = _prepare(images)
  logits, feats = [], []
  for start in range(0, len(x), _EVAL_CHUNK):
    chunk = x[start:start + _EVAL_CHUNK]
    n = len(chunk)
    padded = np.concatenate([chunk, np.zeros((_EVAL_CHUNK - n,) + digits.SHAPE, np.float32)])
    lo, fe = _apply(variables, padded)
    logits.append(np.asarray(lo[:n]))
    feats.append(np.asarray(fe[:n]))
  return np.concatenate(logits), np.concatenate(feats)


def features(params, images) -> np.ndarray:
  """Penultimate-layer embeddings (pre-activation), float32 (N, FEATURE_DIM)."""
  return _forward(params, images)[1]


def accuracy(params, images, labels) -> float:
  logits = _forward(params, images)[0]
  return float(np.mean(np.argmax(logits, axis=-1) == np.asarray(labels)))


def _loss(variables, x, y):
  logits, _ = _model().apply(variables, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train(seed: int = 0, epochs: int = 30, batch_size: int = 50, learning_rate: float = 2e-3,
          log=print):
  """Trains on the digits train split; returns (variables, held-out accuracy)."""
  train_x, train_y = digits.load_split("train")
  test_x, test_y = digits.load_split("test")
  variables = _model().init(jax.random.PRNGKey(seed), jnp.zeros((1,) + digits.SHAPE))
  steps_per_epoch = len(train_x) // batch_size
  schedule = optax.cosine_decay_schedule(learning_rate, epochs * steps_per_epoch)
  tx = optax.adamw(schedule, weight_decay=1e-4)
  opt_state = tx.init(variables)

  @jax.jit
  def step(variables, opt_state, x, y):
    loss, grads = jax.value_and_grad(_loss)(variables, x, y)
    updates, opt_state = tx.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  acc = 0.0
  for epoch in range(1, epochs + 1):
    order = rng.permutation(len(train_x))
    losses = []
    for i in range(steps_per_epoch):
      idx = order[i * batch_size:(i + 1) * batch_size]
      x = _augment(train_x[idx], rng)
      variables, opt_state, loss = step(variables, opt_state, x, train_y[idx])
      losses.append(loss)
    if epoch % 5 == 0 or epoch == epochs:
      acc = accuracy(variables, test_x, test_y)
      log(f"digits classifier: epoch {epoch}/{epochs} loss {float(np.mean(losses)):.4f} "
          f"held-out acc {acc:.4f}")
  return variables, acc


def _augment(x, rng):
  """Random one-pixel shifts (padding with background -1): cheap invariance, better accuracy."""
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
  dy, dx = rng.integers(0, 3, size=2)
  return padded[:, dy:dy + 8, dx:dx + 8]


def save(variables, path: str, heldout_accuracy: float):
  flat = traverse_util.flatten_dict(jax.device_get(variables), sep="/")
  tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in flat.items()}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # Write then rename, so a concurrent reader never sees half a file.
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
  os.close(fd)
  safetensors.numpy.save_file(
      tensors, tmp,
      metadata={"format": _FORMAT, "heldout_accuracy": f"{heldout_accuracy:.6f}"})
  os.replace(tmp, path)


def load(path: str):
  """Reads cached variables, checking every name and shape against the model."""
  loaded = safetensors.numpy.load_file(path)
  expected = traverse_util.flatten_dict(_abstract_variables(), sep="/")
  problems = [f"missing {k}" for k in expected if k not in loaded]
  problems += [f"unexpected {k}" for k in loaded if k not in expected]
  problems += [f"{k}: shape {loaded[k].shape}, expected {expected[k].shape}"
               for k in expected if k in loaded and loaded[k].shape != expected[k].shape]
  if problems:
    raise ValueError(
        f"{path} does not hold this version's digits classifier ({'; '.join(problems)}). "
        "Delete it to retrain.")
  flat = {k: jnp.asarray(v) for k, v in loaded.items()}
  return traverse_util.unflatten_dict(flat, sep="/")


def load_or_train(cache_dir: str, seed: int = 0, log=print):
  """Cached classifier variables, training (and caching) them first if the file is absent."""
  path = os.path.join(cache_dir, CACHE_NAME)
  if os.path.exists(path):
    return load(path)
  log(f"digits classifier: no cache at {path}; training on the digits train split")
  variables, acc = train(seed=seed, log=log)
  save(variables, path, acc)
  return variables


def split_features(params, split: str) -> np.ndarray:
  return features(params, digits.load_split(split)[0])


def fd_to_split(params, images, split: str = "test") -> float:
  mu1, s1 = frechet.feature_stats(features(params, images))
  mu2, s2 = frechet.feature_stats(split_features(params, split))
  return frechet.frechet_distance(mu1, s1, mu2, s2)


def digits_fd(images, cache_dir: str) -> float:
  """FD between the images' features and the held-out real digits' features."""
  return fd_to_split(load_or_train(cache_dir), images, "test")


def real_floor(cache_dir: str) -> float:
  """FD between the train and held-out splits: roughly the best a generator can score."""
  return fd_to_split(load_or_train(cache_dir), digits.load_split("train")[0], "test")
