"""A small MLP velocity net for low-dimensional (toy 2-D) data."""

import jax.numpy as jnp
import flax.linen as nn


def fourier_time_features(t, dim: int, max_period: float = 1000.0):
  """Sinusoidal features of t in [0, 1], scaled up so that small time changes are visible."""
  half = dim // 2
  freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half) / half)
  args = (1000.0 * t)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class MLPVelocity(nn.Module):
  """v(x, t): time features are embedded, added to every hidden layer's input."""
  hidden: int = 256
  depth: int = 3
  time_dim: int = 64

  @nn.compact
  def __call__(self, x, t, cond=None, train: bool = False):
    del cond, train  # unconditional, no dropout
    temb = nn.Dense(self.hidden)(fourier_time_features(t, self.time_dim))
    temb = nn.Dense(self.hidden)(nn.silu(temb))
    h = nn.Dense(self.hidden)(x)
    for _ in range(self.depth - 1):
      h = nn.Dense(self.hidden)(nn.silu(h + temb))
    return nn.Dense(x.shape[-1])(nn.silu(h + temb))


def from_config(model_config):
  return MLPVelocity(hidden=model_config.hidden, depth=model_config.depth,
                     time_dim=model_config.time_dim)
