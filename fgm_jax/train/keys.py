"""The run's random keys, derived once from config.seed and named by purpose.

Each purpose has its own stream; steps then fold in their step number (steps.py), so a
resumed run draws exactly what an uninterrupted one does.
"""

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class RunKeys:
  init: jax.Array  # parameter initialisation
  teacher_step: jax.Array  # flow-matching steps: times, noise, dropout
  fgm_step: jax.Array  # FGM iterations: generator noise, times, path noise


def run_keys(seed: int) -> RunKeys:
  base = jax.random.PRNGKey(seed)
  # The fold-in tags are part of every recorded result: changing one changes every run.
  return RunKeys(init=jax.random.fold_in(base, 0), teacher_step=jax.random.fold_in(base, 1),
                 fgm_step=jax.random.fold_in(base, 2))
