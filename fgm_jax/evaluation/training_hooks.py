"""What a training run evaluates as it goes, as hooks the loop calls after every step.

    hooks = for_run(trainer, config, workdir)    # the ones the config asks for
    hook(step, state, writer)                    # in the loop, after the step (and its save)

The loop takes ``for_run`` as an argument (train_job.py passes it) instead of importing this
module, so train/ imports no evaluation code (big_vision's evaluators work the same way).
Every process calls every hook (sampling is a collective); process 0 writes.

  * ``TrainingPlots``: samples_<step>.png every config.log.plot_every steps: scatter panels
    (2-D data) or image grids, also as a TensorBoard image;
  * ``TrainingFID``: FID-N every config.eval.fid.every steps, as a TensorBoard scalar.
"""

import numpy as np
from absl import logging

from fgm_jax import checkpoint
from fgm_jax import distributed
from fgm_jax.evaluation import evaluate
from fgm_jax.evaluation import evaluators
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


class TrainingPlots:
  """``write`` every config.log.plot_every steps and at the last step (off when 0)."""

  def __init__(self, trainer, config, workdir):
    self.trainer, self.workdir = trainer, workdir
    self.every, self.total = config.log.plot_every, config.num_steps

  def __call__(self, step, state, writer):
    if step % self.every == 0 or step == self.total:
      write(self.trainer, state, step, self.workdir, writer)


class TrainingFID:
  """FID-N of what a run trains, every config.eval.fid.every steps (off when 0).

      hook = TrainingFID.for_run(trainer, config, workdir)   # None when off
      hook(step, state, writer)                             # in the loop, after the step

  Same noise at every evaluation (config.eval.seed), so the curve shows the model, not the
  draw; the scalar is 'fid<N/1000>k/<set>' (e.g. fid10k/fgm_1step).
  """

  def __init__(self, trainer, config, workdir):
    self.trainer, self.config = trainer, config
    self.every, self.num = config.eval.fid.every, config.eval.fid.every_num
    self.evaluator = evaluators.build(trainer, config.eval, workdir)
    self.prefix = f"fid{self.num // 1000}k" if self.num % 1000 == 0 else f"fid{self.num}"

  @classmethod
  def for_run(cls, trainer, config, workdir):
    fid_config = config.eval.fid
    if not fid_config.every:
      return None
    evaluate.require_metric(trainer.data_config, config.eval,
                            f"config.eval.fid.every={fid_config.every}")
    return cls(trainer, config, workdir)

  def __call__(self, step, state, writer):
    if step % self.every:
      return None
    s = self.trainer.samples(state, self.num, self.config.eval.seed)
    value = self.evaluator.metric(s.x, self.num)["fid"]
    name = f"{self.prefix}/{s.key}"
    if writer is not None:
      writer.write_scalars(step, {name: value})
    logging.info("step %d: %s = %.3f", step, name, value)
    return value


def for_run(trainer, config, workdir):
  """The hooks ``config`` asks for (plots, FID), in the order the loop calls them."""
  hooks = [TrainingPlots(trainer, config, workdir)] if config.log.plot_every else []
  fid = TrainingFID.for_run(trainer, config, workdir)
  return hooks + ([fid] if fid is not None else [])
