"""job=sample and job=evaluate: read a run's latest checkpoint, write samples or metrics.

``measure`` is the one evaluation both job=evaluate and the pipeline run: the trainer's sample
sets from one seed's noise, scored by the dataset's evaluator, plus the real-data floor.
"""

import json
import os
import time

from absl import logging

from fgm_jax import checkpoint
from fgm_jax import config_checks
from fgm_jax import distributed
from fgm_jax import export
from fgm_jax import paths
from fgm_jax.evaluation import evaluators
from fgm_jax.train import run_dir
from fgm_jax.train import sampling
from fgm_jax.train import state as state_lib


def sample(config, workdir):
  """samples.npz (key 'x'): teacher with config.sample.steps, or the generator in one step.

  ``workdir`` is a run, or a folder written by job=export (then only config.sample is read).
  Kinds that sample their own way (text-to-image) name their function in train/kinds.py.
  """
  s = config.sample
  start = time.time()
  if export.is_artifact(workdir):
    x = export.load_generator(workdir).sample(s.num, s.seed)
    samples = sampling.generator_set(x)
  elif config_checks.is_fgm(config):  # the generator's weights alone: no teacher, no optimizer
    generator = run_dir.restore_generator(config, workdir, s.weights)
    samples = generator.trainer.generator_samples(generator.params, s.num, s.seed)
  else:
    trainer, state = run_dir.restore_latest(config, workdir)
    samples = trainer.samples(state, s.num, s.seed, s.weights)
  path = os.path.join(workdir, s.output)
  if not distributed.is_writer():  # every process drew the samples (a collective); one writes
    return path
  paths.save_npz(path, x=samples.x)
  logging.info("Wrote %d %s samples to %s (%.1f s).", len(samples.x), samples.label, path,
               time.time() - start)
  print(f"wrote {path}: x{tuple(samples.x.shape)} ({samples.label})")
  return path


def measure(trainer, state, eval_config, workdir):
  """(metrics or None, sample sets, evaluator).

  Every set is drawn from the same noise (eval_config.seed) and scored with the data's
  metric; the real-data floor is added as 'real_data'. Metrics are None where the data has no
  metric here (the sets are still drawn, for pictures).
  """
  evaluator = evaluators.build(trainer, eval_config, workdir)
  n = eval_config.num_samples
  sets = trainer.sample_sets(state, n, eval_config.seed, eval_config.teacher_steps,
                             eval_config.weights)
  if not evaluator.has_metric:
    return None, sets, evaluator
  metrics = {}
  for s in sets:
    metrics[s.key] = evaluator.metric(s.x, n)
    logging.info("%s: %s", s.label, metrics[s.key])
  floor = evaluator.real_floor(n)
  if floor is not None:
    metrics["real_data"] = floor
  return metrics, sets, evaluator


def evaluate(config, workdir):
  """eval.json: metrics of teacher N-step samples and (distill runs) FGM 1-step samples."""
  _, data_config = config_checks.architecture(config)
  require_metric(data_config, config.eval,
                 f"config.job='evaluate' for data.name={data_config.name!r}")
  trainer, state = run_dir.restore_latest(config, workdir)
  e = config.eval
  metrics, _, _ = measure(trainer, state, e, workdir)
  results = {"step": int(state.step), "num_samples": e.num_samples, **metrics}
  if config_checks.is_fgm(config):  # which generator weights the FGM 1-step set used
    results["weights"] = state_lib.weights_given(state, e.weights)
  path = os.path.join(workdir, e.output)
  if not distributed.is_writer():  # every process measured (a collective); one writes
    return results
  checkpoint.write_json(path, results)
  write_scalars(workdir, int(state.step), metrics)
  print(json.dumps(results, indent=2))
  return results


def require_metric(data_config, eval_config, what: str) -> None:
  """Stops with one line when ``what`` cannot be scored for this data (no metric here, a
  missing or wrong weights / statistics file); checked before anything is restored or
  compiled, a user error that main prints without a traceback."""
  evaluator_class = evaluators.evaluator_class(data_config)
  problem = evaluator_class.metric_problem(eval_config)
  if problem:
    raise config_checks.ConfigError(f"{what} {problem}")
  evaluator_class.check_files(eval_config)


def write_scalars(workdir, step, metrics):
  """The metrics as TensorBoard scalars 'eval/<set>/<metric>' in the run's event files
  (process 0: the run's writer)."""
  writer = run_dir.make_writer(workdir)
  if writer is None:
    return
  writer.write_scalars(step, {f"eval/{name}/{k}": v for name, values in metrics.items()
                              for k, v in values.items()})
  writer.close()

