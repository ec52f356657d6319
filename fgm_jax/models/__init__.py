"""Model registry: every velocity net follows one contract.

    module.apply(params, x, t, cond=None, train=False, rngs=...) -> v   (v.shape == x.shape)

with ``t`` in [0, 1] per example (t = 0 data, t = 1 noise). A model converts ``t`` to whatever
its checkpoints expect (e.g. SD3's 1000 * t) inside itself, never in the caller.

A model module may also define, and the trainers use when present:
  * ``LOGICAL_RULES`` (and ``TENSOR_LOGICAL_RULES``): its logical-axis -> mesh-axis rules, the
    default of ``config.mesh.rules``; models without logical names shard by shape.
  * ``example_cond(model_config, batch)``: dummy conditioning for init (models that need one).
  * ``FROZEN_PARAMS``: top-level parameter groups loaded from checkpoints but never trained.
  * ``check_config(model_config)``: what is wrong with its config section, or None (for the
    up-front checks, config_checks.py).
  * ``LORA_TARGETS``: {config.lora.targets name: patterns of the projections it adapts}, for
    models whose dense layers take low-rank adapters (models/lora.py; MM-DiT).
"""

from fgm_jax import registry

# name -> "module:factory". Factories take the model ConfigDict and return a Linen module.
_REGISTRY = {
    "mlp": "fgm_jax.models.mlp:from_config",
    "unet": "fgm_jax.models.unet:from_config",
    "mmdit": "fgm_jax.models.mmdit:from_config",
}
_FIELD = "config.model.name"


def names():
  return sorted(_REGISTRY)


def build(model_config):
  """Returns the Linen module named by ``model_config.name``."""
  return registry.resolve(_REGISTRY, model_config.name, _FIELD)(model_config)


def logical_rules(model_config, tensor_parallel: bool = False):
  """The model's own logical-axis rules (() for models that shard by shape)."""
  module = registry.module(_REGISTRY, model_config.name, _FIELD)
  if tensor_parallel and hasattr(module, "TENSOR_LOGICAL_RULES"):
    return module.TENSOR_LOGICAL_RULES
  return getattr(module, "LOGICAL_RULES", ())


def sharding_rules(mesh_config, model_config):
  """The logical-axis rules of a run: config.mesh.rules when given, else the model's own."""
  rules = mesh_config.rules or logical_rules(model_config, mesh_config.tensor > 1)
  return tuple(tuple(r) for r in rules)


def config_problem(model_config):
  """What is wrong with a model config (its module's check_config), as one message, or None."""
  module = registry.module(_REGISTRY, model_config.name, _FIELD)
  check = getattr(module, "check_config", None)
  return None if check is None else check(model_config)


def example_cond(model_config, batch: int):
  """Dummy conditioning of batch ``batch`` for init, or None for unconditional models."""
  module = registry.module(_REGISTRY, model_config.name, _FIELD)
  fn = getattr(module, "example_cond", None)
  return None if fn is None else fn(model_config, batch)


def frozen_params(model_config):
  """Top-level parameter names the optimizers leave alone (e.g. MM-DiT's positional table)."""
  module = registry.module(_REGISTRY, model_config.name, _FIELD)
  return tuple(getattr(module, "FROZEN_PARAMS", ()))


def lora_targets(model_config):
  """The model's LORA_TARGETS, or None when it takes no low-rank adapters."""
  module = registry.module(_REGISTRY, model_config.name, _FIELD)
  return getattr(module, "LORA_TARGETS", None)
