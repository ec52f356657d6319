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


def _metric_fn(data_config, job):
  if data_config.name == "toy2d":
    from fgm_jax.evaluation import toy_metrics
    reference = job.teacher_job.data.reference if job.kind == "distill" else job.data.reference

    def fn(x, n):
      ref = reference(n)
      return {"energy_distance": toy_metrics.energy_distance(x, ref),
              "sliced_w2": toy_metrics.sliced_wasserstein2(x, ref)}
    return fn
  if data_config.name == "digits":
    from fgm_jax.evaluation import digits_classifier
    cache = os.path.join(os.path.dirname(os.path.abspath(job.workdir)), "_digits_classifier")

    def fn(x, n):
      del n
      return {"fd": digits_classifier.digits_fd(x, cache)}
    return fn
  raise NotImplementedError(
      f"evaluation for data.name={data_config.name!r} needs FID with Inception-V3 weights, "
      "which is not implemented yet; use job=sample and an external FID tool for now.")


def evaluate_job(config, workdir):
  """eval.json: metrics of teacher N-step samples and (distill runs) FGM 1-step samples."""
  job, state = restore_latest(config, workdir)
  job.workdir = workdir
  e = config.eval
  _, data_config = config_checks.architecture(config)
  metric = _metric_fn(data_config, job)
  results = {"step": int(state.step), "num_samples": e.num_samples}
  if job.kind == "teacher":
    teacher_model, teacher_params = job.model, job.sampling_params(state)
    method = config.sample.method
  else:
    teacher_model, teacher_params = job.model, job.teacher_params
    method = job.teacher_job.config.sample.method
    x = sampling.job_samples(job, state, e.num_samples, e.seed)
    results["fgm_1step"] = metric(x, e.num_samples)
    logging.info("FGM 1-step: %s", results["fgm_1step"])
  for k in e.teacher_steps:
    x = sampling.teacher_samples(teacher_model, teacher_params, e.num_samples, job.shape,
                                 e.seed, k, method)
    results[f"teacher_{method}_{k}step"] = metric(x, e.num_samples)
    logging.info("teacher %d-step: %s", k, results[f"teacher_{method}_{k}step"])
  path = os.path.join(workdir, e.get("output", "eval.json"))
  checkpoint.write_json(path, results)
  print(json.dumps(results, indent=2))
  return results
