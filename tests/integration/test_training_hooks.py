"""The training loop's per-step hooks: the loop calls what its caller passes (it imports no
evaluation code), and job=train/distill pass the hooks the config asks for (plots here)."""

import os

from fgm_jax import main as main_lib
from fgm_jax.evaluation import training_hooks
from fgm_jax.train import loop
from tests import helpers


def test_loop_calls_the_hooks_it_is_given_after_every_step(tmp_path):
  config = helpers.tiny_teacher_config(num_steps=5, every=5)
  calls, built = [], []

  def make_hooks(trainer, run_config, workdir):
    built.append((trainer, run_config.num_steps, workdir))
    return [lambda step, state, writer: calls.append((step, int(state.step), writer))]

  trainer, _ = loop.train(config, str(tmp_path), write_metrics=False, progress=False,
                          hooks=make_hooks)
  assert built == [(trainer, 5, str(tmp_path))]  # built once, with the run's trainer
  # After each step, with that step's state; no writer without write_metrics.
  assert calls == [(s, s, None) for s in range(1, 6)]


def test_training_job_passes_the_configs_hooks(tmp_path):
  config = helpers.tiny_teacher_config(num_steps=4, every=4)
  assert training_hooks.for_run(None, config, str(tmp_path)) == []  # nothing asked for
  config.log.plot_every = 3
  main_lib.run(config, str(tmp_path))  # job=train, as the command line runs it
  # Every plot_every steps and at the last step.
  assert sorted(os.listdir(tmp_path / "plots")) == ["samples_0000003.png",
                                                    "samples_0000004.png"]
