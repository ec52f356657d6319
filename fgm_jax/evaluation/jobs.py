"""job=sample and job=evaluate: read a run's latest checkpoint, write samples or metrics."""

import json
import os
import time

import jax
import numpy as np
from absl import logging

from fgm_jax import checkpoint
from fgm_jax import config_checks
from fgm_jax import parallel
from fgm_jax.train import jobs
from fgm_jax.train import loop
from fgm_jax.train import sampling


def restore_latest(config, workdir, mesh=None):
  """(job, state) of the newest checkpoint in ``workdir``, or a clear error."""
  mesh = mesh or parallel.mesh_from_config(config.mesh)
  ckpt_dir = checkpoint.checkpoint_dir(workdir)
  step = checkpoint.latest_step(ckpt_dir)
  if step is None:
    kind = "distill" if config_checks.is_distill(config) else "teacher"
    raise checkpoint.CheckpointNotFoundError(
        f"--workdir={workdir} holds no checkpoint (looked in {ckpt_dir}). Train first with "
        f"--config.job={kind} and the same --workdir, or point --workdir at a finished run.")
  config_checks.compare_with_saved(config, checkpoint.read_meta(ckpt_dir, step), workdir)
  job = jobs.build(config, mesh)
  mgr = checkpoint.manager(ckpt_dir, async_save=False)
  state, _ = loop.restore_or_init(job, mgr, step)
  mgr.close()
  return job, state


def sample_job(config, workdir):
  """samples.npz (key 'x'): teacher with config.sample.steps, or the generator in one step."""
  job, state = restore_latest(config, workdir)
  s = config.sample
  start = time.time()
  x = sampling.job_samples(job, state, s.num, s.seed, s.steps, s.get("use_ema", True))
  path = os.path.join(workdir, s.get("output", "samples.npz"))
  np.savez(path, x=x)
  what = (f"teacher {s.steps}-step {s.method}" if job.kind == "teacher" else "FGM 1-step")
  logging.info("Wrote %d %s samples to %s (%.1f s).", len(x), what, path, time.time() - start)
  print(f"wrote {path}: x{tuple(x.shape)} ({what})")
  return path


def default_classifier_dir(config, workdir):
  """Where the digits classifier is cached: config.eval.classifier_dir, else beside the run
  (for runs/digits/fgm that is runs/digits/digits_classifier, the pipeline's own cache)."""
  chosen = config.get("eval", {}).get("classifier_dir", None)
  return chosen or os.path.join(os.path.dirname(os.path.abspath(workdir)), "digits_classifier")


def _data_source(job):
  return job.teacher_job.data if job.kind == "distill" else job.data


METRIC_DATA = ("toy2d", "digits")  # data with a metric here (tfds images need FID weights)


def metric_fn(data_config, job, classifier_dir=None):
  """fn(samples, n) -> {metric: value}, or None when this data has no metric here."""
  if data_config.name == "toy2d":
    from fgm_jax.evaluation import toy_metrics
    reference = _data_source(job).reference

    def fn(x, n):
      ref = reference(n)
      return {"energy_distance": toy_metrics.energy_distance(x, ref),
              "sliced_w2": toy_metrics.sliced_wasserstein2(x, ref)}
    return fn
  if data_config.name == "digits":
    from fgm_jax.evaluation import digits_classifier

    def fn(x, n):
      del n
      return {"fd": digits_classifier.digits_fd(x, classifier_dir)}
    return fn
  return None


def real_floor(data_config, job, metric, n, classifier_dir=None):
  """The metric of real data against the reference: what a perfect generator would score.

  digits: the 1,500 train images vs the 297 held-out ones (so evaluate 1,500 samples to
  compare); toy 2-D: a second independent draw of n fresh points.
  """
  if data_config.name == "digits":
    from fgm_jax.evaluation import digits_classifier
    return {"fd": digits_classifier.real_floor(classifier_dir)}
  if data_config.name == "toy2d":
    return metric(_data_source(job).reference(n, seed=54321), n)
  return None


def sample_sets(job, state, eval_config):
  """Named sample sets drawn from the SAME noise (eval_config.seed), for a fair comparison.

  Keys: 'fgm_1step' (distill runs) then 'teacher_<method>_<k>step' for k in teacher_steps.
  """
  n, seed = eval_config.num_samples, eval_config.seed
  out = {}
  if job.kind == "teacher":
    teacher_params, method = job.sampling_params(state), job.config.sample.method
  else:
    teacher_params, method = job.teacher_params, job.teacher_job.config.sample.method
    out["fgm_1step"] = sampling.job_samples(job, state, n, seed)
  for k in eval_config.teacher_steps:
    out[f"teacher_{method}_{k}step"] = sampling.teacher_samples(
        job.model, teacher_params, n, job.shape, seed, k, method)
  return out


def evaluate_samples(sets, metric, n):
  """{name: metrics} for every sample set."""
  results = {}
  for name, x in sets.items():
    results[name] = metric(x, n)
    logging.info("%s: %s", name, results[name])
  return results


def measure(job, state, data_config, eval_config, classifier_dir):
  """(metrics or None, sample sets): every set drawn from the same noise, scored with this
  data's metric, plus the real-data floor as 'real_data'. None where the data has no metric
  here (tfds images need FID)."""
  sets = sample_sets(job, state, eval_config)
  metric = metric_fn(data_config, job, classifier_dir)
  if metric is None:
    return None, sets
  n = eval_config.num_samples
  metrics = evaluate_samples(sets, metric, n)
  floor = real_floor(data_config, job, metric, n, classifier_dir)
  if floor is not None:
    metrics["real_data"] = floor
  return metrics, sets


def evaluate_job(config, workdir):
  """eval.json: metrics of teacher N-step samples and (distill runs) FGM 1-step samples."""
  _, data_config = config_checks.architecture(config)
  if data_config.name not in METRIC_DATA:
    # Checked before restoring anything; a user error, so main prints it without a traceback.
    raise config_checks.ConfigError(
        f"config.job='evaluate' for data.name={data_config.name!r} needs FID with Inception-V3 "
        "weights, which is not implemented yet; use --config.job=sample and an external FID "
        "tool on samples.npz for now.")
  job, state = restore_latest(config, workdir)
  e = config.eval
  metrics, _ = measure(job, state, data_config, e, default_classifier_dir(config, workdir))
  results = {"step": int(state.step), "num_samples": e.num_samples, **metrics}
  path = os.path.join(workdir, e.get("output", "eval.json"))
  checkpoint.write_json(path, results)
  print(json.dumps(results, indent=2))
  return results
