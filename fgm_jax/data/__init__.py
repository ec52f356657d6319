"""Data sources, one registry.

Every source is deterministic in (seed, step): ``batch(step, ...)`` returns the same examples
for the same step, so a resumed run sees exactly the data an uninterrupted one would have.

    source = data.build(config.data, seed)
    source.shape                      # per-example shape, e.g. (2,) or (8, 8, 1)
    source.batch(step, global_batch, process_index=0, process_count=1)
        -> float32 np.ndarray of shape (global_batch // process_count, *shape):
           this process's slice of the global batch for that step.

Each source module also says, without loading anything, what an example looks like
(``example_shape(data_config)``, default ``data_config.shape``) and what is wrong with a data
config (``check_config(data_config) -> message or None``), for the up-front config checks.
"""

from fgm_jax import registry

# name -> "module:factory"; factories take (data_config, seed) and return a source.
_REGISTRY = {
    "toy2d": "fgm_jax.data.toy2d:from_config",
    "digits": "fgm_jax.data.digits:from_config",
    "mnist5k": "fgm_jax.data.mnist5k:from_config",
    "tfds": "fgm_jax.data.tfds_images:from_config",
}
_FIELD = "config.data.name"


def names():
  return sorted(_REGISTRY)


def build(data_config, seed: int):
  return registry.resolve(_REGISTRY, data_config.name, _FIELD)(data_config, seed)


def example_shape(data_config):
  """Per-example shape of the data a config names (no data is loaded)."""
  module = registry.module(_REGISTRY, data_config.name, _FIELD)
  if hasattr(module, "example_shape"):
    return tuple(module.example_shape(data_config))
  return tuple(data_config.shape)


def config_problem(data_config):
  """What is wrong with a data config, as one message naming the field, or None."""
  module = registry.module(_REGISTRY, data_config.name, _FIELD)
  check = getattr(module, "check_config", None)
  return None if check is None else check(data_config)
