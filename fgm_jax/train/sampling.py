"""Drawing samples from a trained job: teacher N-step ODE, generator one step."""

import functools

import jax
import numpy as np

from fgm_jax.train import steps


@functools.partial(jax.jit, static_argnames=("model", "num_steps", "method", "shift"))
def _teacher_chunk(params, noise, *, model, num_steps, method, shift):
  return steps.teacher_sample(model, params, noise, num_steps, method, shift)


@functools.partial(jax.jit, static_argnames=("model", "t_star"))
def _generator_chunk(params, z, *, model, t_star):
  return steps.generate(model, params, z, t_star)


def noise(n: int, shape, seed: int) -> np.ndarray:
  """The same starting noise for every sampler with the same seed (fair comparisons)."""
  return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (n,) + tuple(shape)))


def _chunked(fn, z, chunk):
  return np.concatenate([np.asarray(fn(z[i:i + chunk])) for i in range(0, len(z), chunk)])


def teacher_samples(model, params, n, shape, seed, num_steps, method="euler", shift=1.0,
                    chunk=4096):
  fn = functools.partial(_teacher_chunk, params, model=model, num_steps=num_steps,
                         method=method, shift=shift)
  return _chunked(fn, noise(n, shape, seed), chunk)


def generator_samples(model, params, n, shape, seed, t_star, chunk=4096):
  fn = functools.partial(_generator_chunk, params, model=model, t_star=t_star)
  return _chunked(fn, noise(n, shape, seed), chunk)


def job_samples(job, state, n, seed, num_steps=None, use_ema=True, chunk=4096):
  """Samples of what a run trains: the teacher's ODE, or the one-step generator."""
  params = job.sampling_params(state, use_ema)
  if job.kind == "teacher":
    s = job.config.sample
    return teacher_samples(job.model, params, n, job.shape, seed, num_steps or s.steps,
                           s.method, s.get("shift", 1.0), chunk)
  return generator_samples(job.model, params, n, job.shape, seed, job.config.fgm.t_star, chunk)
