"""Periodic pictures during training: scatter panels (2-D data) or image grids."""

import numpy as np

from fgm_jax import checkpoint
from fgm_jax import distributed
from fgm_jax.evaluation import plots

PLOT_SEED = 7  # fixed noise, so successive pictures show the same samples evolving


def picture(trainer, state, n: int) -> np.ndarray:
  """The teacher's config.log.teacher_steps panels (and FGM 1-step for distill runs)."""
  sets = trainer.sample_sets(state, n, PLOT_SEED, trainer.config.log.teacher_steps)
  if _is_point_cloud(trainer.shape):
    return plots.scatter_panels({s.label: s.x for s in sets})
  grids = [plots.image_grid(s.x[:plots.GRID_IMAGES], ncols=8) for s in sets]
  gap = np.full((grids[0].shape[0], 4, 3), 255, np.uint8)
  out = grids[0]
  for g in grids[1:]:
    out = np.concatenate([out, gap, g], axis=1)
  return out


def _is_point_cloud(shape):
  return len(shape) == 1


def write(trainer, state, step: int, workdir: str, writer, n: int = 2000):
  """samples_<step>.png in the workdir and an image summary in TensorBoard. Every process
  draws (sampling is a collective); process 0 writes."""
  image = picture(trainer, state, n)
  if not distributed.is_writer():
    return
  folder = checkpoint.as_path(workdir) / "plots"
  folder.mkdir(parents=True, exist_ok=True)
  upscale = 1 if _is_point_cloud(trainer.shape) else 4
  plots.save_png(str(folder / f"samples_{step:07d}.png"), image, upscale)
  if writer is not None:
    writer.write_images(step, {"samples": image[None]})
