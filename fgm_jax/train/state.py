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
class DistillState:
  """Generator (with EMA) and online flow; the frozen teacher lives outside the state."""
  step: jax.Array
  gen_params: Any
  gen_opt_state: Any
  gen_ema_params: Any
  online_params: Any
  online_opt_state: Any


def init_params(model, rng, example_shape, cond=None, batch=1):
  """Parameters (possibly logically boxed) from a dummy input; they do not depend on
  ``batch``, which only has to be one the mesh can split (``cond`` has that batch too)."""
  x = jnp.zeros((batch,) + tuple(example_shape), jnp.float32)
  t = jnp.zeros((batch,), jnp.float32)
  return model.init(rng, x, t, cond)["params"]


def teacher_state(params, tx) -> TeacherState:
  return TeacherState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), ema_params=_copy(params))


def distill_state(teacher_params, gen_tx, online_tx) -> DistillState:
  """Generator and online flow both start as copies of the teacher (DESIGN.md §2)."""
  gen = _copy(teacher_params)
  online = _copy(teacher_params)
  return DistillState(step=jnp.zeros((), jnp.int32), gen_params=gen,
                      gen_opt_state=gen_tx.init(gen), gen_ema_params=_copy(teacher_params),
                      online_params=online, online_opt_state=online_tx.init(online))


def _copy(tree):
  # A real copy inside jit, so that donated buffers of the state never alias each other.
  return jax.tree.map(lambda x: x + 0 if hasattr(x, "dtype") else x, tree)
