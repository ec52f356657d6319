"""Device mesh, parameter/optimizer-state shardings and global batches.

Data parallel over every device with FSDP sharding of parameters and optimizer state: the
modern form of what ``jax.pmap`` did. Mesh axes are ('data', 'fsdp') (plus 'tensor' when a
config asks for it); a batch is split over all of them.

Shardings come from, per leaf:
  * logical axis names (``nn.with_logical_partitioning``) mapped to mesh axes by the config's
    rules, for models that annotate their parameters (MM-DiT);
  * otherwise a shape rule: shard the largest dimension divisible by the 'fsdp' axis size,
    replicate leaves with no such dimension (biases of odd size, scalars).
Both rules depend only on a leaf's names/shape, so Adam moments and EMA copies of a parameter
always get that parameter's sharding.
"""

import math
from typing import Optional, Sequence

import jax
import numpy as np
import flax.linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh; data = -1 takes all devices left over."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if data == -1:
    if n % (fsdp * tensor):
      raise ValueError(f"config.mesh: fsdp * tensor = {fsdp * tensor} does not divide the "
                       f"{n} devices; choose axis sizes whose product divides {n}.")
    data = n // (fsdp * tensor)
  if data * fsdp * tensor != n:
    raise ValueError(f"config.mesh: data * fsdp * tensor = {data * fsdp * tensor} but there are "
                     f"{n} devices; set config.mesh.data=-1 to use all devices.")
  return Mesh(np.asarray(devices).reshape(data, fsdp, tensor), MESH_AXES)


def mesh_from_config(mesh_config, devices=None) -> Mesh:
  return make_mesh(mesh_config.data, mesh_config.fsdp, mesh_config.get("tensor", 1), devices)


def shape_rule_spec(shape: Sequence[int], fsdp_size: int) -> P:
  """Shards the largest dimension divisible by fsdp_size over 'fsdp'."""
  if fsdp_size <= 1 or not shape:
    return P()
  candidates = [(size, -i) for i, size in enumerate(shape) if size % fsdp_size == 0]
  if not candidates:
    return P()
  _, neg_axis = max(candidates)
  spec = [None] * len(shape)
  spec[-neg_axis] = "fsdp"
  return P(*spec)


def _is_box(x):
  return isinstance(x, nn.LogicallyPartitioned)


def leaf_spec(leaf, mesh: Mesh, rules) -> P:
  if _is_box(leaf):
    return nn.logical_to_mesh_axes(leaf.names, rules)
  return shape_rule_spec(getattr(leaf, "shape", ()), mesh.shape["fsdp"])


def tree_shardings(abstract_tree, mesh: Mesh, rules=()):
  """NamedShardings for every leaf of a (possibly logically boxed) abstract pytree.

  The result has the structure of the *unboxed* tree (boxes become single leaves).
  """
  rules = tuple(tuple(r) for r in rules)
  return jax.tree.map(lambda leaf: NamedSharding(mesh, leaf_spec(leaf, mesh, rules)),
                      abstract_tree, is_leaf=_is_box)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every data-parallel device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_device_count(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def global_batch(local_batch: np.ndarray, mesh: Mesh) -> jax.Array:
  """A global array from this process's slice of the batch (multi-host safe)."""
  sharding = batch_sharding(mesh)
  global_shape = (local_batch.shape[0] * jax.process_count(),) + local_batch.shape[1:]
  return jax.make_array_from_process_local_data(sharding, local_batch, global_shape)


def constrain_batch(x, mesh: Mesh):
  """Inside jit: keep per-example random draws split like the data."""
  return jax.lax.with_sharding_constraint(x, batch_sharding(mesh))


def unbox(tree):
  return nn.meta.unbox(tree)
