"""The learning-rate schedule: warm-up, constant, and the optional cosine fall (decay_steps)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from fgm_jax.train import optim


def _cosine(lr, step, start, end, final):
  """The fall written out: lr * (final + (1 - final) * (1 + cos(pi * k / T)) / 2)."""
  k = min(max(step - start, 0), end - start)
  return lr * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * k / (end - start))))


@pytest.mark.parametrize("warmup,start,end,final", [(0, 6, 16, 0.0), (4, 4, 10, 0.1),
                                                    (3, 8, 20, 0.5)])
def test_schedule_follows_warmup_constant_and_cosine(warmup, start, end, final):
  o = common.optim(lr=2e-3, warmup_steps=warmup, decay_steps=(start, end), final_lr_scale=final)
  assert optim.check_config(o, "config.optim") is None
  schedule = optim.learning_rate_schedule(o)
  for step in range(end + 5):
    if step < warmup:
      want = 2e-3 * step / warmup
    elif step < start:
      want = 2e-3
    else:
      want = _cosine(2e-3, step, start, end, final)
    np.testing.assert_allclose(float(schedule(step)), want, rtol=1e-5, atol=1e-9,
                               err_msg=f"step {step}")


def test_decayed_run_starts_as_the_constant_run():
  """Up to decay_steps[0] the decayed schedule is the constant one, and both optimizers keep
  the same state tree: a constant-lr checkpoint at that step continues as the decayed run."""
  const = common.optim(lr=1e-3, warmup_steps=5)
  decayed = common.optim(lr=1e-3, warmup_steps=5, decay_steps=(30, 60))
  for step in range(31):
    assert float(optim.learning_rate_schedule(const)(step)) == pytest.approx(
        float(optim.learning_rate_schedule(decayed)(step)), rel=1e-6)
  params = {"w": jnp.ones((3,))}
  trees = [jax.tree.structure(optim.make_optimizer(o).init(params)) for o in (const, decayed)]
  assert trees[0] == trees[1]
