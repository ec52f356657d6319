"""Low-rank adapters (LoRA) over a frozen base: W x + b  ->  W x + b + s (x A) B.

FGM trains two copies of the teacher (generator and online flow). With ``config.lora.rank``
> 0 the teacher's weights are the one frozen base all three networks apply, and each trained
network is only its adapters: per adapted projection ``lora_a`` (in, rank), random like
peft's default (uniform, bound 1/sqrt(in)), and ``lora_b`` (rank, out), zero, so a fresh
adapter leaves the projection exactly as the teacher's (step 0 equals the teacher).

Adapters are a params tree of their own, nested like the base (module paths), with leaves
``lora_a`` / ``lora_b`` in place of ``kernel`` / ``bias``. ``compose`` puts them beside the
base's kernels (B scaled by s = alpha / rank), and ``Dense`` -- the layer of models that
declare ``LORA_TARGETS`` -- applies them on the activations, never forming W + s A B: the
frozen base is held once, in the teacher's dtype, and only the adapters get gradients and
optimizer states. ``merge`` forms W + s A B (exports, one-step sampling).

Sharding: an adapter shards like its base -- ``lora_a`` keeps the kernel's input axis name,
``lora_b`` its output axis name (and a scanned run's 'layers' axis); the rank axis is named
'lora' and replicated.

Pure: jax, flax and numpy only.
"""

import re
import zlib
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

A, B = "lora_a", "lora_b"
RANK_AXIS = "lora"


class Dense(nn.Module):
  """``nn.Dense`` (same params: kernel, bias) that also applies the adapters ``lora_a`` /
  ``lora_b`` when its params carry them (put there by ``compose``; B already scaled)."""
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, inputs):
    kernel = self.param("kernel", self.kernel_init, (inputs.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    y = _matmul(x, kernel)
    if self.has_variable("params", A):
      a, b = nn.dtypes.promote_dtype(self.get_variable("params", A),
                                     self.get_variable("params", B), dtype=self.dtype)
      y = y + _matmul(_matmul(x, a), b)
    return y + bias.reshape((1,) * (y.ndim - 1) + (-1,))


def _matmul(x, w):
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


class Adapters(NamedTuple):
  """What ``config.lora`` asks of a model: rank, scale s = alpha / rank, and the patterns
  (regular expressions over '/'-joined module paths) of the projections to adapt."""
  rank: int
  scale: float
  patterns: tuple

  def adapted(self, path) -> bool:
    """Whether the kernel at params path ``path`` (a tuple ending in 'kernel') is adapted."""
    if path[-1] != "kernel":
      return False
    module = "/".join(path[:-1])
    return any(re.fullmatch(p, module) for p in self.patterns)

  def kernels(self, base):
    """{module path: kernel leaf} of the adapted projections of ``base``."""
    flat = traverse_util.flatten_dict(_plain(base))
    return {path[:-1]: leaf for path, leaf in flat.items() if self.adapted(path)}

  def init(self, base, rng):
    """Fresh adapters for ``base`` (arrays, shapes, or logically boxed leaves): A random,
    B zero. A is keyed by its module path, so it is the same on every mesh."""
    out = {}
    for module, kernel in self.kernels(base).items():
      key = jax.random.fold_in(rng, zlib.crc32("/".join(module).encode()))
      out[module + (A,)], out[module + (B,)] = _pair(kernel, self.rank, key)
    return traverse_util.unflatten_dict(out)

  def compose(self, adapters, base):
    """``base`` with each adapter beside its kernel (B scaled by s): the params the model
    applies for an adapted network. Builds a tree; forms no W + s A B."""
    flat = traverse_util.flatten_dict(_plain(base))
    for path, leaf in traverse_util.flatten_dict(adapters).items():
      flat[path] = leaf * self.scale if path[-1] == B and self.scale != 1.0 else leaf
    return traverse_util.unflatten_dict(flat)

  def merge(self, adapters, base, dtype=jnp.float32):
    """``base`` (in ``dtype``) with every adapted kernel replaced by W + s A B: one network's
    weights, for exports and one-step sampling (numpy arrays stay numpy, on the host)."""
    lib = _lib(jax.tree.leaves(base)[0])
    flat = {p: lib.asarray(v).astype(dtype) for p, v in traverse_util.flatten_dict(base).items()}
    pairs = traverse_util.flatten_dict(adapters)
    for module in {p[:-1] for p in pairs}:
      a = lib.asarray(pairs[module + (A,)]).astype(dtype)
      b = lib.asarray(pairs[module + (B,)]).astype(dtype)
      flat[module + ("kernel",)] = flat[module + ("kernel",)] + self.scale * lib.matmul(a, b)
    return traverse_util.unflatten_dict(flat)

  def rank_problem(self, base) -> Optional[str]:
    """'config.lora...' when the rank exceeds an adapted projection's dims, or none is
    adapted; None when the adapters fit ``base``."""
    kernels = self.kernels(base)
    if not kernels:
      return ("config.lora.targets matches no projection of this model; choose from "
              "the model's LORA_TARGETS.")
    dims = {m: tuple(_shape(k)[-2:]) for m, k in kernels.items()}
    module, (d_in, d_out) = min(sorted(dims.items()), key=lambda kv: min(kv[1]))
    if self.rank > min(d_in, d_out):
      return (f"config.lora.rank={self.rank} exceeds the projection {'/'.join(module)} "
              f"({d_in} -> {d_out}); choose --config.lora.rank <= {min(d_in, d_out)}.")
    return None


def _pair(kernel, rank, key):
  names = getattr(kernel, "names", None)
  shape = _shape(kernel)
  *lead, d_in, d_out = shape
  bound = 1.0 / d_in ** 0.5
  a = jax.random.uniform(key, (*lead, d_in, rank), jnp.float32, -bound, bound)
  b = jnp.zeros((*lead, rank, d_out), jnp.float32)
  if names is None:
    return a, b
  names = tuple(names)  # the kernel's box (nn.LogicallyPartitioned), with the rank axis
  return (kernel.replace(value=a, names=names[:-1] + (RANK_AXIS,)),
          kernel.replace(value=b, names=names[:-2] + (RANK_AXIS, names[-1])))


def _shape(leaf):
  return getattr(leaf, "value", leaf).shape


def _plain(tree):
  # flax's FrozenDict and plain dicts alike; boxed leaves stay boxed.
  return tree.unfreeze() if hasattr(tree, "unfreeze") else tree


def _lib(x):
  return np if isinstance(x, np.ndarray) or np.isscalar(x) else jnp


def targets_problem(lora_config, model_targets) -> Optional[str]:
  """What is wrong with config.lora for a model whose ``LORA_TARGETS`` are
  ``model_targets`` (None: the model has no adapters), or None."""
  c = lora_config
  if c.rank == 0:
    return None
  if c.rank < 0:
    return f"config.lora.rank={c.rank} must be >= 0 (0: no adapters, full fine-tuning)."
  if model_targets is None:
    return (f"config.lora.rank={c.rank}: this model has no low-rank adapters (only the "
            "MM-DiT has, configs/sd3_fgm.py); set --config.lora.rank=0.")
  unknown = [t for t in c.targets if t not in model_targets]
  if unknown or not c.targets:
    return (f"config.lora.targets={tuple(c.targets)!r}: choose one or more of "
            f"{sorted(model_targets)}.")
  if c.alpha is not None and c.alpha <= 0:
    return f"config.lora.alpha={c.alpha} must be > 0 (None: alpha = rank, scale 1)."
  return None


def from_config(lora_config, model_targets) -> Optional[Adapters]:
  """The Adapters config.lora asks for (None when rank is 0), for a model whose
  ``LORA_TARGETS`` are ``model_targets``; assumes ``targets_problem`` found none."""
  c = lora_config
  if c.rank == 0:
    return None
  alpha = float(c.rank if c.alpha is None else c.alpha)
  patterns = tuple(p for t in c.targets for p in model_targets[t])
  return Adapters(rank=int(c.rank), scale=alpha / c.rank, patterns=patterns)
