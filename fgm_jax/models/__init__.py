"""Model registry: every velocity net follows one contract.

    module.apply(params, x, t, cond=None, train=False, rngs=...) -> v   (v.shape == x.shape)

with ``t`` in [0, 1] per example (t = 0 data, t = 1 noise). A model converts ``t`` to whatever
its checkpoints expect (e.g. SD3's 1000 * t) inside itself, never in the caller.
"""

from fgm_jax import registry

# name -> "module:factory". Factories take the model ConfigDict and return a Linen module.
_REGISTRY = {
    "mlp": "fgm_jax.models.mlp:from_config",
    "unet": "fgm_jax.models.unet:from_config",
    "mmdit": "fgm_jax.models.mmdit:from_config",
}


def names():
  return sorted(_REGISTRY)


def build(model_config):
  """Returns the Linen module named by ``model_config.name``."""
  return registry.resolve(_REGISTRY, model_config.name, "config.model.name")(model_config)
