"""Data sources, one registry.

Every source is deterministic in (seed, step): ``batch(step, ...)`` returns the same examples
for the same step, so a resumed run sees exactly the data an uninterrupted one would have.

    source = data.build(config.data, seed)
    source.shape                      # per-example shape, e.g. (2,) or (8, 8, 1)
    source.batch(step, global_batch, process_index=0, process_count=1)
        -> float32 np.ndarray of shape (global_batch // process_count, *shape):
           this process's slice of the global batch for that step.
"""

from fgm_jax import registry

# name -> "module:factory"; factories take (data_config, seed) and return a source.
_REGISTRY = {
    "toy2d": "fgm_jax.data.toy2d:from_config",
    "digits": "fgm_jax.data.digits:from_config",
    "tfds": "fgm_jax.data.tfds_images:from_config",
}


def names():
  return sorted(_REGISTRY)


def build(data_config, seed: int):
  return registry.resolve(_REGISTRY, data_config.name, "config.data.name")(data_config, seed)
