"""fgm_jax: Flow Generator Matching in JAX/Flax.

Distils a multi-step flow-matching (rectified-flow) model into a one-step generator.
Conventions (see DESIGN.md): t = 0 is data, t = 1 is noise, x_t = (1 - t) x0 + t eps.
"""

__version__ = "0.1.0"


def load_generator(path: str):
  """An exported one-step generator (job=export): ``gen.sample(n, seed)`` or ``gen(z)``."""
  from fgm_jax import export
  return export.load_generator(path)
