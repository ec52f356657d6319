"""Fréchet distance in the features of a small CNN classifier trained on a data set's train split.

FID's idea at the scale of small grey image sets (8x8 digits, 28x28 MNIST): a CNN trained on
the TRAIN split (never the held-out one) embeds images; generated samples are compared with
the held-out images by the Fréchet distance between Gaussians fitted to those embeddings.
What differs between data sets is one ``Spec`` (input shape, conv stages, training recipe,
where the splits come from); the network, training, caching and FD are shared here.

    spec = Spec(name="digits", shape=(8, 8, 1), stages=((32, 32), (64,)),
                load_split=digits.load_split)
    variables = load_or_train(spec, cache_dir)   # trains once, then reads the cache
    fd_to_split(spec, variables, samples)        # samples: (N, *spec.shape) in [-1, 1]
    real_floor(spec, cache_dir)                  # FD(train, held-out): what real data scores
    fd_spread(spec, cache_dir, draw, seeds)      # the FD's noise over repeated draws

The classifier is cached as ``<cache_dir>/<name>_classifier.safetensors``; training is
deterministic for a given seed.
"""

import dataclasses
import functools
import os
from typing import Callable, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors.numpy
from flax import traverse_util

from fgm_jax import paths
from fgm_jax.evaluation import frechet

_EVAL_CHUNK = 512


@dataclasses.dataclass(frozen=True)
class Spec:
  """One data set's classifier.

  load_split(split) -> (float32 images (N, *shape) in [-1, 1], int labels (N,)) for 'train'
  and 'test'. stages: conv channels per resolution, 2x average pooling between stages.
  max_shift: training augmentation, random shifts of up to this many pixels (background -1).
  """
  name: str
  shape: Tuple[int, int, int]
  stages: Tuple[Tuple[int, ...], ...]
  load_split: Callable
  feature_dim: int = 64
  num_classes: int = 10
  epochs: int = 30
  batch_size: int = 50
  learning_rate: float = 2e-3
  max_shift: int = 1

  @property
  def cache_name(self) -> str:
    return f"{self.name}_classifier.safetensors"

  @property
  def format(self) -> str:
    return f"fgm_jax.{self.name}_classifier/1"


class SmallCNN(nn.Module):
  """3x3 conv + ReLU stages, 2x average pooling between them, then a feature_dim embedding and
  logits."""
  stages: Tuple[Tuple[int, ...], ...]
  feature_dim: int
  num_classes: int

  @nn.compact
  def __call__(self, x):
    for i, stage in enumerate(self.stages):
      if i:
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
      for channels in stage:
        x = nn.relu(nn.Conv(channels, (3, 3))(x))
    x = x.reshape(x.shape[0], -1)
    # Features are taken before the ReLU: no dead (constant) dimensions, so the fitted
    # covariances stay full rank.
    feats = nn.Dense(self.feature_dim)(x)
    return nn.Dense(self.num_classes)(nn.relu(feats)), feats


def model(spec: Spec) -> SmallCNN:
  return SmallCNN(stages=spec.stages, feature_dim=spec.feature_dim,
                  num_classes=spec.num_classes)


def _abstract_variables(spec):
  return jax.eval_shape(model(spec).init, jax.random.PRNGKey(0), jnp.zeros((1,) + spec.shape))


@functools.lru_cache(maxsize=None)
def _applier(spec):
  """One jitted forward per spec (so one compile per data set and process)."""
  return jax.jit(model(spec).apply)


def prepare(spec, images) -> np.ndarray:
  """Clips to [-1, 1] (generators overshoot) and restores the channel axis if dropped."""
  x = np.asarray(images, dtype=np.float32)
  if x.ndim == 3 and spec.shape[-1] == 1:
    x = x[..., None]
  if x.shape[1:] != spec.shape:
    raise ValueError(f"{spec.name} images must be (N, {', '.join(map(str, spec.shape))}), "
                     f"got {x.shape}.")
  return np.clip(x, -1.0, 1.0)


def _forward(spec, variables, images):
  """(logits, features) for any number of images, in fixed-size chunks (one compile)."""
  x = prepare(spec, images)
  apply = _applier(spec)
  logits, feats = [], []
  for start in range(0, len(x), _EVAL_CHUNK):
    chunk = x[start:start + _EVAL_CHUNK]
    n = len(chunk)
    padded = np.concatenate([chunk, np.zeros((_EVAL_CHUNK - n,) + spec.shape, np.float32)])
    lo, fe = apply(variables, padded)
    logits.append(np.asarray(lo[:n]))
    feats.append(np.asarray(fe[:n]))
  return np.concatenate(logits), np.concatenate(feats)


def features(spec, variables, images) -> np.ndarray:
  """Penultimate-layer embeddings (pre-activation), float32 (N, spec.feature_dim)."""
  return _forward(spec, variables, images)[1]


def accuracy(spec, variables, images, labels) -> float:
  logits = _forward(spec, variables, images)[0]
  return float(np.mean(np.argmax(logits, axis=-1) == np.asarray(labels)))


def _augment(x, rng, max_shift):
  """A random shift of the whole batch by up to max_shift pixels (padding with background -1):
  cheap invariance, better accuracy."""
  s = max_shift
  padded = np.pad(x, ((0, 0), (s, s), (s, s), (0, 0)), constant_values=-1.0)
  dy, dx = rng.integers(0, 2 * s + 1, size=2)
  return padded[:, dy:dy + x.shape[1], dx:dx + x.shape[2]]


def train(spec: Spec, seed: int = 0, epochs=None, log=print):
  """Trains on the spec's train split; returns (variables, held-out accuracy).

  ``epochs`` overrides spec.epochs (quick classifiers for tests).
  """
  epochs = spec.epochs if epochs is None else epochs
  net = model(spec)
  train_x, train_y = spec.load_split("train")
  test_x, test_y = spec.load_split("test")
  variables = net.init(jax.random.PRNGKey(seed), jnp.zeros((1,) + spec.shape))
  steps_per_epoch = len(train_x) // spec.batch_size
  schedule = optax.cosine_decay_schedule(spec.learning_rate, epochs * steps_per_epoch)
  tx = optax.adamw(schedule, weight_decay=1e-4)
  opt_state = tx.init(variables)

  def loss_fn(variables, x, y):
    logits, _ = net.apply(variables, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(variables, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(variables, x, y)
    updates, opt_state = tx.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  acc = 0.0
  for epoch in range(1, epochs + 1):
    order = rng.permutation(len(train_x))
    losses = []
    for i in range(steps_per_epoch):
      idx = order[i * spec.batch_size:(i + 1) * spec.batch_size]
      x = _augment(train_x[idx], rng, spec.max_shift)
      variables, opt_state, loss = step(variables, opt_state, x, train_y[idx])
      losses.append(loss)
    if epoch % 5 == 0 or epoch == epochs:
      acc = accuracy(spec, variables, test_x, test_y)
      log(f"{spec.name} classifier: epoch {epoch}/{epochs} loss {float(np.mean(losses)):.4f} "
          f"held-out acc {acc:.4f}")
  return variables, acc


def save(spec, variables, path: str, heldout_accuracy: float):
  flat = traverse_util.flatten_dict(jax.device_get(variables), sep="/")
  tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in flat.items()}
  paths.makedirs(os.path.dirname(paths.absolute(path)))
  # Written whole (paths.write_bytes), so a concurrent reader never sees half a file.
  paths.write_bytes(path, safetensors.numpy.save(
      tensors, metadata={"format": spec.format, "heldout_accuracy": f"{heldout_accuracy:.6f}"}))


def load(spec, path: str):
  """Reads cached variables, checking every name and shape against the model."""
  loaded = safetensors.numpy.load(paths.read_bytes(path))
  expected = traverse_util.flatten_dict(_abstract_variables(spec), sep="/")
  problems = [f"missing {k}" for k in expected if k not in loaded]
  problems += [f"unexpected {k}" for k in loaded if k not in expected]
  problems += [f"{k}: shape {loaded[k].shape}, expected {expected[k].shape}"
               for k in expected if k in loaded and loaded[k].shape != expected[k].shape]
  if problems:
    raise ValueError(
        f"{path} does not hold this version's {spec.name} classifier ({'; '.join(problems)}). "
        "Delete it to retrain.")
  flat = {k: jnp.asarray(v) for k, v in loaded.items()}
  return traverse_util.unflatten_dict(flat, sep="/")


def load_or_train(spec, cache_dir: str, seed: int = 0, log=print):
  """Cached classifier variables, training (and caching) them first if the file is absent."""
  path = os.path.join(cache_dir, spec.cache_name)
  if paths.exists(path):
    return load(spec, path)
  log(f"{spec.name} classifier: no cache at {path}; training on the {spec.name} train split")
  variables, acc = train(spec, seed=seed, log=log)
  save(spec, variables, path, acc)
  return variables


def split_features(spec, variables, split: str) -> np.ndarray:
  return features(spec, variables, spec.load_split(split)[0])


def fd_to_split(spec, variables, images, split: str = "test") -> float:
  """FD between the images' features and a real split's (held-out by default)."""
  mu1, s1 = frechet.feature_stats(features(spec, variables, images))
  mu2, s2 = frechet.feature_stats(split_features(spec, variables, split))
  return frechet.frechet_distance(mu1, s1, mu2, s2)


def real_floor(spec, cache_dir: str) -> float:
  """FD between the train and held-out splits: roughly the best a generator can score."""
  return fd_to_split(spec, load_or_train(spec, cache_dir), spec.load_split("train")[0], "test")


def fd_spread(spec, cache_dir: str, draw: Callable, seeds) -> dict:
  """The FD's noise over repeated draws: ``draw(seed)`` returns a sample set (e.g. a sampler's
  N images from that seed's noise, or N real train images picked with that seed); each is
  scored against the held-out split. Returns the FDs and their mean and standard deviation
  (ddof 1): differences between runs smaller than about 2 x std are not resolved."""
  variables = load_or_train(spec, cache_dir)
  fds = [fd_to_split(spec, variables, draw(int(seed))) for seed in seeds]
  return {"fds": fds, "mean": float(np.mean(fds)),
          "std": float(np.std(fds, ddof=1)) if len(fds) > 1 else 0.0}
