"""Periodic pictures during training: scatter panels (2-D data) or image grids."""

import numpy as np

from fgm_jax import checkpoint
from fgm_jax.evaluation import plots
from fgm_jax.train import sampling

PLOT_SEED = 7  # fixed noise, so successive pictures show the same samples evolving


def panels(job, state, n: int):
  """Named sample sets to show for the current state."""
  if job.kind == "teacher":
    steps = job.config.sample.steps
    return {f"teacher {steps}-step": sampling.job_samples(job, state, n, PLOT_SEED)}
  teacher_cfg = job.teacher_job.config
  out = {}
  for k in job.config.log.get("teacher_steps", (4,)):
    out[f"teacher {k}-step"] = sampling.teacher_samples(
        job.model, job.teacher_params, n, job.shape, PLOT_SEED, k, teacher_cfg.sample.method)
  out["FGM 1-step"] = sampling.job_samples(job, state, n, PLOT_SEED)
  return out


def picture(job, state, n: int) -> np.ndarray:
  sets = panels(job, state, n)
  if job.shape == (2,):
    return plots.scatter_panels(sets)
  grids = [plots.image_grid(x[:64], ncols=8) for x in sets.values()]
  gap = np.full((grids[0].shape[0], 4, 3), 255, np.uint8)
  out = grids[0]
  for g in grids[1:]:
    out = np.concatenate([out, gap, g], axis=1)
  return out


def write(job, state, step: int, workdir: str, writer, n: int = 2000):
  """samples_<step>.png in the workdir and an image summary in TensorBoard."""
  image = picture(job, state, n)
  folder = checkpoint.as_path(workdir) / "plots"
  folder.mkdir(parents=True, exist_ok=True)
  upscale = 1 if job.shape == (2,) else 4
  plots.save_png(str(folder / f"samples_{step:07d}.png"), image, upscale)
  if writer is not None:
    writer.write_images(step, {"samples": image[None]})
