"""Where RealUID's game leaves a one-step generator when the teacher is imperfect (1-D).

    python experiments/realuid_1d_game.py            # ~1 min on 2 CPU cores

Data N(0.3, 0.4²); an imperfect teacher whose flow is that of N(0, 0.6²); a Gaussian
generator N(mu, sigma²) starting at the teacher. The online flow is held at its closed-form
minimiser (fgm.py, DESIGN.md §2)

    v_psi = [beta p v_theta + (1 - beta) p* v*] / [alpha p + (1 - alpha) p*]

and the generator descends RealUID's loss (fgm.real_data_generator_loss with alpha = 0.5's
1/2 form, uniform weighting) by Monte Carlo until it settles. Printed: where it settles for
several (alpha, beta). At a point where the generator matches the data, stationarity reads
v_T = beta v_theta + (1 - beta) v*: with beta < 1 the student's flow lies beyond the
teacher's, away from the data; with beta > 1 it is a convex mix of the teacher's and the
data's, weight (beta - 1)/beta on the data.
"""

import jax
import jax.numpy as jnp

from fgm_jax import fgm

jax.config.update("jax_enable_x64", True)

DATA = (0.3, 0.4)
TEACHER = (0.0, 0.6)


def gaussian_flow(x, t, mean, std):
  """E[eps - x0 | x_t = x] for x0 ~ N(mean, std²), x_t = (1 - t) x0 + t eps."""
  m, var = (1 - t) * mean, (1 - t) ** 2 * std ** 2 + t ** 2
  return t * (x - m) / var - (mean + (1 - t) * std ** 2 * (x - m) / var)


def gaussian_density(x, t, mean, std):
  m, var = (1 - t) * mean, (1 - t) ** 2 * std ** 2 + t ** 2
  return jnp.exp(-(x - m) ** 2 / (2 * var)) / jnp.sqrt(2 * jnp.pi * var)


def generator_loss(theta, key, alpha_r, beta_r, n=4096):
  mean, std = theta[0], jnp.exp(theta[1])
  frozen = jax.lax.stop_gradient((mean, std))  # the online flow is psi, not theta
  kz, ke, kt = jax.random.split(key, 3)
  z, eps = jax.random.normal(kz, (n, 1)), jax.random.normal(ke, (n, 1))
  t = jax.random.uniform(kt, (n,), minval=0.02, maxval=0.98)

  def online(x, tt):
    tt = tt[:, None]
    p, p_data = gaussian_density(x, tt, *frozen), gaussian_density(x, tt, *DATA)
    v, v_data = gaussian_flow(x, tt, *frozen), gaussian_flow(x, tt, *DATA)
    return (beta_r * p * v + (1 - beta_r) * p_data * v_data) / (
        alpha_r * p + (1 - alpha_r) * p_data)

  teacher = lambda x, tt: gaussian_flow(x, tt[:, None], *TEACHER)
  x0 = mean + std * z
  return fgm.real_data_generator_loss(teacher, online, x0, eps, t, alpha_r, beta_r, 0.5,
                                      "uniform")


def settle(alpha_r, beta_r, steps=3000, lr=0.02):
  theta = jnp.array([TEACHER[0], jnp.log(TEACHER[1])])
  grad = jax.jit(jax.grad(generator_loss), static_argnums=(2, 3))
  for i in range(steps):
    theta = theta - lr * grad(theta, jax.random.PRNGKey(i), alpha_r, beta_r)
  return float(theta[0]), float(jnp.exp(theta[1]))


def main():
  print(f"data N{DATA}, teacher's flow N{TEACHER}; the generator settles at:")
  print("| alpha | beta | beta/alpha | mean | std | share of the way to the data (mean) |")
  print("|---|---|---|---|---|---|")
  for a, b in [(1.0, 1.0), (0.92, 0.94), (0.92, 0.9016), (0.8, 0.8), (0.6, 0.54),
               (0.9, 1.1), (0.8, 1.2), (0.5, 1.5), (0.5, 2.0)]:
    mean, std = settle(a, b)
    share = (mean - TEACHER[0]) / (DATA[0] - TEACHER[0])
    print(f"| {a} | {b} | {b / a:.3f} | {mean:+.3f} | {std:.3f} | {share:+.2f} |", flush=True)


if __name__ == "__main__":
  main()
