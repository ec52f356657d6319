"""The one-step generator as a standalone artifact: job=export writes it, load_generator reads it.

    python -m fgm_jax.main --config=configs/toy2d_fgm.py:quick --config.job=export \\
        --workdir=runs/toy_quick/fgm                 # -> runs/toy_quick/fgm/generator/

    import fgm_jax
    gen = fgm_jax.load_generator("runs/toy_quick/fgm/generator")
    x = gen.sample(10_000, seed=0)                   # or gen(z) with z ~ N(0, I) of gen.shape

An artifact folder holds

    generator.safetensors   the generator's parameters ('/'-joined names), EMA by default
    generator.json          format, model config, t*, example shape, step, which weights
                            (config.export.weights; 'ema_decay' their EMA's), teacher, FGM
                            settings, metrics (when the run was evaluated)
    README.md               the same metadata for people, and how to load it

Nothing else is needed: no teacher, no training config, no orbax. The safetensors file holds
only arrays, so loading it runs no code.
"""

import dataclasses
import json
import os
import time
from typing import Any, Callable, Dict, Tuple

import numpy as np

from fgm_jax import paths

FORMAT = "fgm_jax.generator/1"
META_NAME = "generator.json"
WEIGHTS_NAME = "generator.safetensors"


def is_artifact(path: str) -> bool:
  return paths.is_file(os.path.join(path, META_NAME))


# --- writing ---------------------------------------------------------------------------------


def export(config, workdir):
  """job=export: the newest checkpoint's generator -> an artifact folder; returns its path."""
  import jax
  from fgm_jax import config_checks
  from fgm_jax import models
  from fgm_jax import params_tree
  from fgm_jax.train import run_dir

  model_config = config.teacher.model
  if models.example_cond(model_config, 1) is not None:
    raise config_checks.ConfigError(
        f"config.job='export' writes unconditional one-step generators (MLP / U-Net); "
        f"model.name={model_config.name!r} needs conditioning, whose export is not built yet.")
  e = config.export
  # The generator's weights alone: not the online flow, the optimizer states or the teacher.
  generator = run_dir.restore_generator(config, workdir, e.weights)
  out = e.output or os.path.join(workdir, "generator")
  flat = {"/".join(path): np.asarray(x)
          for path, x in params_tree.flatten(jax.device_get(generator.params)).items()}
  meta = {
      "format": FORMAT,
      "model": model_config.to_dict(),
      "t_star": float(config.fgm.t_star),
      "example_shape": list(generator.trainer.shape),
      # What was written, not what was asked: 'ema' of a run without EMA is 'raw'.
      "weights": generator.weights,
      "ema_decay": _ema_decay(config.optim, generator.weights),
      "use_ema": generator.weights != "raw",
      "step": generator.step,
      "parameters": int(sum(x.size for x in flat.values())),
      "teacher": _trained_teacher(config, workdir),
      "fgm": config.fgm.to_dict(),
      "metrics": _run_metrics(workdir, config.eval.output),
      "exported": time.strftime("%Y-%m-%d %H:%M:%S"),
      "source_workdir": paths.absolute(workdir),
  }
  if jax.process_index() == 0:
    _write(out, flat, meta)
  print(f"wrote {out}: one-step generator, step {meta['step']}, "
        f"{meta['parameters']:,} parameters ({_describe(meta)} weights)")
  return out


def _ema_decay(optim_config, weights):
  """The decay of the EMA named ``weights`` (None for the raw weights)."""
  from fgm_jax.train import optim
  if weights == "raw":
    return None
  return float(optim_config.ema_decay) if weights == "ema" else optim.ema_decay_of(weights)


def _describe(meta) -> str:
  """'raw', or e.g. 'EMA 0.9999' (metadata of older exports: 'EMA')."""
  if not meta["use_ema"]:
    return "raw"
  return f"EMA {meta['ema_decay']}" if meta.get("ema_decay") is not None else "EMA"

def _trained_teacher(config, workdir):
  """The teacher the run was distilled from, as the run recorded it (its config.json): the
  command-line config may name another place (the pipeline sets it per workdir)."""
  teacher = config.teacher.to_dict()
  saved = os.path.join(workdir, "config.json")
  if paths.is_file(saved):
    teacher = paths.read_json(saved).get("config", {}).get("teacher", teacher)
  return {"workdir": teacher.get("workdir"), "num_steps": teacher.get("num_steps"),
          "data": teacher.get("data")}


def _run_metrics(workdir, eval_name):
  """The run's evaluation, if any: job=evaluate's file in the workdir, or the pipeline's one
  level up (<pipeline workdir>/eval.json beside <pipeline workdir>/fgm)."""
  for path in (os.path.join(workdir, eval_name),
               os.path.join(os.path.dirname(paths.absolute(workdir)), "eval.json")):
    if paths.is_file(path):
      found = paths.read_json(path)
      return {"file": paths.absolute(path), "metrics": found.get("metrics", found)}
  return None


def _write(out, flat, meta):
  import safetensors.numpy
  paths.makedirs(out)
  # Each file is written whole (paths.write_bytes), and the metadata file, which marks an
  # artifact, last: a crash never leaves half an artifact that looks complete.
  paths.write_bytes(os.path.join(out, WEIGHTS_NAME),
                    safetensors.numpy.save(flat, metadata={"format": FORMAT}))
  paths.write_text(os.path.join(out, "README.md"), _readme(meta))
  paths.write_json(os.path.join(out, META_NAME), meta)


def _readme(meta) -> str:
  metrics = meta["metrics"]
  lines = [
      "# FGM one-step generator", "",
      f"Exported {meta['exported']} from `{meta['source_workdir']}` at step {meta['step']} "
      f"({_describe(meta)} weights). Model: {meta['model']['name']}, "
      f"{meta['parameters']:,} parameters; samples of shape {tuple(meta['example_shape'])}; "
      f"t* = {meta['t_star']}.", "",
      f"Teacher: `{meta['teacher']['workdir']}` ({meta['teacher']['num_steps']} steps of flow "
      f"matching on {meta['teacher']['data']['name']}). FGM: alpha {meta['fgm']['alpha']}, "
      f"weighting {meta['fgm']['weighting']}.", "",
      ("Metrics (from " + metrics["file"] + "):\n\n```\n"
       + json.dumps(metrics["metrics"], indent=2, sort_keys=True) + "\n```"
       if metrics else "Not evaluated before export."), "",
      "## Use", "", "```python", "import fgm_jax",
      "gen = fgm_jax.load_generator('<this folder>')",
      "x = gen.sample(1000, seed=0)   # numpy, shape (1000, *gen.shape)", "```", "",
      "or from the command line (any config of the same model):", "",
      "```", "python -m fgm_jax.main --config=<config> --config.job=sample "
      "--workdir=<this folder>", "```", "",
  ]
  return "\n".join(lines)


# --- reading ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Generator:
  """A loaded one-step generator: ``gen(z)`` maps noise of ``(n, *gen.shape)`` to samples."""
  apply: Callable  # jitted z -> x
  shape: Tuple[int, ...]
  meta: Dict[str, Any]

  def __call__(self, z):
    return self.apply(z)

  def sample(self, n: int, seed: int = 0, chunk: int = 4096) -> np.ndarray:
    """n samples from the noise of ``seed`` (the same noise a run's sample job draws)."""
    from fgm_jax.train import sampling
    return sampling.draw(self.apply, sampling.noise(n, self.shape, seed), chunk)


def load_generator(path: str) -> Generator:
  """Reads an artifact folder written by job=export; clear errors for anything else."""
  import functools

  import jax
  import ml_collections
  import safetensors.numpy

  from fgm_jax import models
  from fgm_jax import params_tree
  from fgm_jax.train import steps

  meta_path = os.path.join(path, META_NAME)
  if not paths.is_file(meta_path):
    raise FileNotFoundError(
        f"{path} is not an exported generator (no {META_NAME}); write one with "
        "--config.job=export --workdir=<distill run>.")
  meta = paths.read_json(meta_path)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}.")
  flat = safetensors.numpy.load(paths.read_bytes(os.path.join(path, WEIGHTS_NAME)))
  params = params_tree.unflatten({tuple(k.split("/")): v for k, v in flat.items()})
  model = models.build(ml_collections.ConfigDict(_tuples(meta["model"])))
  fn = jax.jit(functools.partial(steps.generate, model, t_star=meta["t_star"]))
  return Generator(apply=functools.partial(fn, params), shape=tuple(meta["example_shape"]),
                   meta=meta)


def _tuples(obj):
  """JSON turned the config's tuples into lists; models expect tuples back."""
  if isinstance(obj, dict):
    return {k: _tuples(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return tuple(_tuples(v) for v in obj)
  return obj
