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

Everything that is traced for a run (init, train steps, samplers) goes through one
``ShardingContext``: it traces inside ``jax.set_mesh(mesh)`` and ``nn.logical_axis_rules(rules)``
so that the models' ``nn.with_logical_constraint`` calls take effect, and its rules default to
the model's own (``models.sharding_rules``), so a config that names none still shards MM-DiT.
"""

import contextlib
import math
from typing import Sequence

import jax
import flax.linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(data: int, fsdp: int, tensor: int, n: int):
  """(data, fsdp, tensor) sizes for ``n`` devices, or ValueError naming config.mesh."""
  for name, size in (("fsdp", fsdp), ("tensor", tensor)):
    if size < 1:
      raise ValueError(f"config.mesh.{name}={size} must be >= 1.")
  if data != -1 and data < 1:
    raise ValueError(f"config.mesh.data={data} must be >= 1, or -1 for all devices left over.")
  if data == -1:
    if n % (fsdp * tensor):
      raise ValueError(f"config.mesh: fsdp * tensor = {fsdp * tensor} does not divide the "
                       f"{n} devices; choose axis sizes whose product divides {n}.")
    data = n // (fsdp * tensor)
  if data * fsdp * tensor != n:
    raise ValueError(f"config.mesh: data * fsdp * tensor = {data * fsdp * tensor} but there are "
                     f"{n} devices; set config.mesh.data=-1 to use all devices.")
  return data, fsdp, tensor


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh; data = -1 takes all devices left over.

  ``jax.make_mesh`` orders the devices by the hardware topology (ICI rings on TPU); the axes
  are Auto, so GSPMD propagates shardings between the constraints we set.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(data, fsdp, tensor, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def fsdp_rules(replicated: Sequence[str]):
  """Logical rules of a transformer under FSDP: the batch over every data-parallel device,
  the hidden width 'embed' over 'fsdp', every other named axis replicated."""
  return (("batch", BATCH_AXES), ("embed", "fsdp")) + tuple((n, None) for n in replicated)


TENSOR_SPLIT = ("heads", "mlp", "act_heads", "act_mlp")


def tensor_parallel_rules(rules):
  """The same rules plus Megatron-style splits of heads and MLP (and their activations)
  over 'tensor', for a ('data', 'fsdp', 'tensor') mesh."""
  return tuple((n, "tensor") if n in TENSOR_SPLIT else (n, a) for n, a in rules)


def mesh_from_config(mesh_config, devices=None) -> Mesh:
  return make_mesh(mesh_config.data, mesh_config.fsdp, mesh_config.tensor, devices)


class ShardingContext:
  """A mesh and its logical-axis rules; traces and runs a run's jitted functions under both.

  Every function a run compiles is made by ``jit`` here, so no step, initialiser or sampler is
  ever traced without the rules (flax reads them at trace time, and jax's compilation cache
  does not key on them, so tracing outside once would stick).
  """

  def __init__(self, mesh: Mesh, rules=()):
    self.mesh = mesh
    self.rules = tuple(tuple(r) for r in rules)

  @contextlib.contextmanager
  def active(self):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def jit(self, fn, **jit_kwargs):
    """jax.jit(fn) whose every call (and so its tracing) runs inside the context."""
    jitted = jax.jit(fn, **jit_kwargs)

    def call(*args):
      with self.active():
        return jitted(*args)

    call.jitted = jitted  # for cache inspection in tests
    return call

  def eval_shape(self, fn, *args):
    with self.active():
      return jax.eval_shape(fn, *args)

  def shardings(self, abstract_tree):
    return tree_shardings(abstract_tree, self.mesh, self.rules)

  def batch(self):
    return batch_sharding(self.mesh)

  def replicated(self):
    return replicated(self.mesh)


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


def global_batch(local_batch, mesh: Mesh):
  """Global arrays from this process's slice of a batch (an array or a pytree of them, e.g.
  prompt embeddings), split over the data-parallel devices. Multi-host safe."""
  sharding = batch_sharding(mesh)

  def one(local):
    global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
    return jax.make_array_from_process_local_data(sharding, local, global_shape)

  return jax.tree.map(one, local_batch)


def constrain_batch(x, mesh: Mesh):
  """Inside jit: keep per-example random draws split like the data."""
  return jax.lax.with_sharding_constraint(x, batch_sharding(mesh))


def unbox(tree):
  return nn.meta.unbox(tree)
