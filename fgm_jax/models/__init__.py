"""Model registry: every velocity net follows one contract.

    module.apply(params, x, t, cond=None, train=False, rngs=...) -> v   (v.shape == x.shape)

with ``t`` in [0, 1] per example (t = 0 data, t = 1 noise). A model converts ``t`` to whatever
its checkpoints expect (e.g. SD3's 1000 * t) inside itself, never in the caller.
"""

import importlib

# name -> "module:factory". Factories take the model ConfigDict and return a Linen module.
# Imported lazily so that a toy run never pays for importing the U-Net or MM-DiT code.
_REGISTRY = {
    "mlp": "fgm_jax.models.mlp:from_config",
    "unet": "fgm_jax.models.unet:from_config",
    "mmdit": "fgm_jax.models.mmdit:from_config",
}


def names():
  return sorted(_REGISTRY)


def build(model_config):
  """Returns the Linen module named by ``model_config.name``."""
  name = model_config.name
  if name not in _REGISTRY:
    raise ValueError(
        f"config.model.name={name!r} is not a known model; choose one of {names()}.")
  module_name, factory = _REGISTRY[name].split(":")
  return getattr(importlib.import_module(module_name), factory)(model_config)
