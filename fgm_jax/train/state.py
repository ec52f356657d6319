"""Train states as explicit pytrees (one per job) and their initialisers."""

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class TeacherState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any


@struct.dataclass
class FGMState:
  """Generator (with EMA) and online flow; the frozen teacher lives outside the state.

  ``gen_ema_params`` is None when the run keeps no EMA (``optim.ema_decay == 0``): at SD3
  scale a copy of the generator is 8 GB of device memory that would only equal its weights.
  ``gen_extra_emas``: {name: params} of the further EMAs (``optim.extra_ema_decays``; each
  name, optim.ema_name, carries its decay); {} without them, and in checkpoints saved before
  the field existed (checkpoint.read restores those without it).
  """
  step: jax.Array
  gen_params: Any
  gen_opt_state: Any
  gen_ema_params: Any
  online_params: Any
  online_opt_state: Any
  gen_extra_emas: Any = struct.field(default_factory=dict)


def init_params(model, rng, example_shape, cond=None, batch=1):
  """Parameters (possibly logically boxed) from a dummy input; they do not depend on
  ``batch``, which only has to be one the mesh can split (``cond`` has that batch too)."""
  x = jnp.zeros((batch,) + tuple(example_shape), jnp.float32)
  t = jnp.zeros((batch,), jnp.float32)
  return model.init(rng, x, t, cond)["params"]


def teacher_state(params, tx) -> TeacherState:
  return TeacherState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), ema_params=_copy(params))


def fgm_state(teacher_params, gen_tx, online_tx, ema: bool = True,
                  online_params=None, extra_emas=()) -> FGMState:
  """Generator and online flow both start as copies of the teacher (DESIGN.md §2), in
  float32 whatever the teacher's storage dtype (a bf16-held teacher still trains fp32 nets).
  ``teacher_params`` is the generator's start; ``online_params`` (default: the same) the
  online flow's, for the initialisation ablations. Every EMA (``extra_emas``: the names of
  the further ones) starts as the generator."""
  gen = _copy(teacher_params, jnp.float32)
  online = _copy(teacher_params if online_params is None else online_params, jnp.float32)
  return FGMState(step=jnp.zeros((), jnp.int32), gen_params=gen,
                      gen_opt_state=gen_tx.init(gen),
                      gen_ema_params=_copy(teacher_params, jnp.float32) if ema else None,
                      online_params=online, online_opt_state=online_tx.init(online),
                      gen_extra_emas={name: _copy(teacher_params, jnp.float32)
                                      for name in extra_emas})


# The generator weights a run keeps, by name: 'raw', the trained weights; 'ema', their EMA at
# config.optim.ema_decay; and 'ema_<decay>' for each of config.optim.extra_ema_decays.
GENERATOR_BRANCHES = {"raw": ("gen_params",), "ema": ("gen_ema_params",)}
EXTRA_EMAS = "gen_extra_emas"


def generator_branch(weights: str) -> tuple:
  """The path of the generator weights named ``weights`` in an FGMState (or its saved
  tree)."""
  return GENERATOR_BRANCHES.get(weights, (EXTRA_EMAS, weights))


def saved_weights(saved_tree: dict) -> list:
  """The weight names a saved FGMState tree (checkpoint.saved_tree) holds arrays for."""
  def held(path):
    node = saved_tree
    for key in path:
      node = node.get(key) if isinstance(node, dict) else None
    return bool(jax.tree.leaves(node))
  extra = saved_tree.get(EXTRA_EMAS) or {}
  return [name for name in [*GENERATOR_BRANCHES, *sorted(extra)]
          if held(generator_branch(name))]


def weights_given(state: FGMState, weights: str = "ema") -> str:
  """Which weights generator_params(state, weights) gives: 'ema' of a run that keeps no EMA
  is its raw weights (what an export must record, not what was asked)."""
  return "raw" if weights == "ema" and state.gen_ema_params is None else weights


def generator_params(state: FGMState, weights: str = "ema"):
  """The generator weights named ``weights`` ('ema' falls back to raw without an EMA)."""
  weights = weights_given(state, weights)
  node = state
  for key in generator_branch(weights):
    if isinstance(node, dict) and key not in node:
      raise KeyError(f"weights={weights!r}: this run keeps no such generator weights; it "
                     f"keeps {['ema', 'raw', *sorted(state.gen_extra_emas)]}.")
    node = node[key] if isinstance(node, dict) else getattr(node, key)
  return node


def _copy(tree, dtype=None):
  # A real copy inside jit, so that donated buffers of the state never alias each other.
  def copy(x):
    if not hasattr(x, "dtype"):
      return x
    return x.astype(dtype) if dtype is not None and x.dtype != dtype else x + 0
  return jax.tree.map(copy, tree)
