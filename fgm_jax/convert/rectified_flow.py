"""Import a RectifiedFlow (score_sde NCSN++) CIFAR-10 checkpoint as one of our teacher runs.

    python -m fgm_jax.convert.rectified_flow CHECKPOINT.pth OUT_WORKDIR [--weights=ema|model]
        [--config=configs/cifar10_teacher.py:rf_teacher] [--config.<field>=<value> ...]

CHECKPOINT.pth is a file written by gnobitab/RectifiedFlow's training code
(``ImageGeneration/run_lib.py``, e.g. the published 1-Rectified-Flow ``checkpoint_8.pth``,
step 800k, FID 2.58 with RK45). OUT_WORKDIR becomes a teacher workdir that the rest of fgm_jax
reads as if our own teacher job had written it:

    OUT_WORKDIR/checkpoints/<step>/   orbax TeacherState (fgm_jax/train/state.py) at their step
    OUT_WORKDIR/config.json           the teacher config, saved as run_dir.prepare_workdir does
    OUT_WORKDIR/provenance.json       source file, sha256, weights chosen, step, what was dropped

so that ``--config.teacher.workdir=OUT_WORKDIR`` with ``configs/cifar10_fgm.py:rf_teacher``
distils it, and ``--config=configs/cifar10_teacher.py:rf_teacher --config.job=sample
--workdir=OUT_WORKDIR`` samples it. Needs torch (CPU is enough) for this one-off conversion
only; nothing at train time imports torch.

Weights (--weights): 'ema' (default) is the EMA shadow copy, which RectifiedFlow's evaluation
samples with (run_lib.py: ``ema.copy_to(score_model.parameters())`` before sampling); 'model'
is the raw training weights. The chosen weights fill both ``params`` and ``ema_params`` of
the saved state, so the distiller (config.teacher.use_ema) and job=sample
(config.sample.weights) read them whatever those fields say. The optimizer state is fresh
(zero Adam moments); RectifiedFlow's Adam moments are not imported.

What the file holds (their ``utils.save_checkpoint``, read with ``torch.load(...,
weights_only=True, map_location='cpu')`` only; a file that needs unpickling is refused):
``{'optimizer', 'model', 'ema': {'decay', 'num_updates', 'shadow_params'}, 'step'}``. The model
keys carry DataParallel's ``module.`` prefix (stripped); its float64 ``sigmas`` buffer is not a
weight (dropped, named in provenance.json); ``shadow_params`` is an unnamed list in
``model.parameters()`` order, which equals the model state dict's key order without buffers:
the EMA tensors are paired with names by that order, and every pair's shapes are checked (many
shapes repeat, so matching by shape would be wrong).

Architecture: module 2's width gives nf, the module list gives ch_mult, num_res_blocks and the
attention levels (``rectified_flow_keys.infer_architecture``); the image size and channels
come from the config's data shape, everything else (dropout, the time convention
v(x, t) = -u(x, 999 (1 - t)), embedding) from the config's model, which must be in the
``unet.rectified_flow_cifar10()`` family. What was read overrides the config's model fields
and is what config.json records, so a narrow test checkpoint converts into a narrow teacher.
A checkpoint whose module list does not parse falls back to the config's values and stops
with the first missing / unexpected / mis-shaped tensors. The key mapping (their module
index -> our parameter path) is in ``fgm_jax/convert/rectified_flow_keys.py``'s docstring.
"""

import datetime
import os
import sys
from typing import Callable, Dict, Mapping, Optional

import numpy as np

from fgm_jax.convert import common
from fgm_jax.convert import rectified_flow_keys as keys_lib

WEIGHTS = ("ema", "model")
BUFFERS = ("sigmas",)  # score_sde NCSNpp's only buffer: VE noise levels, not a weight
PREFIX = "module."  # torch.nn.DataParallel's
PROVENANCE_NAME = "provenance.json"
DEFAULT_CONFIG = "configs/cifar10_teacher.py:rf_teacher"
WHERE_TO_GET = ("the RectifiedFlow README (github.com/gnobitab/RectifiedFlow, ImageGeneration, "
                "'Pre-trained Checkpoints': 'CIFAR10 1-Rectified Flow', checkpoint_8.pth)")


class CheckpointFileError(common.ConversionError, FileNotFoundError):
  """The checkpoint file is missing."""


# --------------------------------------------------------------------------------------------
# Reading the file.


def load_checkpoint(path: str) -> dict:
  """The checkpoint's top-level dict, read with weights_only=True onto the CPU."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointFileError(f"RectifiedFlow checkpoint {path!r} does not exist; download it "
                              f"from {WHERE_TO_GET} and pass its path.")
  ckpt = common.load_torch_file(
      path,
      pickled_hint="Re-save only its tensors and plain values, e.g. torch.save({k: ckpt[k] for "
      "k in ('model', 'ema', 'step')}, 'clean.pth') in a session that trusts the file.",
      unreadable_hint="A partial download? The published checkpoint_8.pth is about 990 MB.")
  if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("model"), Mapping):
    found = sorted(ckpt) if isinstance(ckpt, Mapping) else type(ckpt).__name__
    raise common.ConversionError(
        f"{path!r} is not a RectifiedFlow training checkpoint: expected a dict with 'model' "
        f"(and 'ema', 'step'), found {found}.")
  return ckpt


def _numpy(tensor) -> np.ndarray:
  return tensor.detach().cpu().float().numpy()


def model_tensors(ckpt: Mapping) -> Dict[str, object]:
  """{key: tensor} of 'model' without DataParallel's prefix, buffers included, in file order."""
  return {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in ckpt["model"].items()}


def parameter_names(tensors: Mapping[str, object]):
  """The model's parameter names in state-dict order: what shadow_params is ordered by."""
  return [k for k in tensors if k not in BUFFERS]


def ema_tensors(ckpt: Mapping, names, path: str = "the checkpoint") -> Dict[str, object]:
  """{name: EMA tensor}, pairing shadow_params with the parameter names by order."""
  ema = ckpt.get("ema")
  shadow = ema.get("shadow_params") if isinstance(ema, Mapping) else None
  if not isinstance(shadow, (list, tuple)):
    raise common.ConversionError(
        f"{path} has no EMA ('ema': {{'shadow_params': [...]}}); convert its raw weights with "
        "--weights=model.")
  if len(shadow) != len(names):
    raise common.ConversionError(
        f"{path}: the EMA has {len(shadow)} shadow tensors but the model has {len(names)} "
        "parameters, so they cannot be paired by order; use --weights=model for the raw weights.")
  model = model_tensors(ckpt)
  bad = [(i, n, tuple(s.shape), tuple(model[n].shape)) for i, (n, s) in
         enumerate(zip(names, shadow)) if tuple(s.shape) != tuple(model[n].shape)]
  if bad:
    listing = "; ".join(f"shadow_params[{i}] {g} vs {n} {w}" for i, n, g, w in bad[:4])
    raise common.ConversionError(
        f"{path}: {len(bad)} EMA tensor(s) differ in shape from the parameter at the same "
        f"position ({listing}); the EMA does not belong to this model. Use --weights=model.")
  return dict(zip(names, shadow))


# --------------------------------------------------------------------------------------------
# The teacher config and state.


def teacher_config_for(base_config, shapes: Mapping[str, tuple]):
  """(config, inferred fields or None): ``base_config`` with the checkpoint's architecture."""
  from fgm_jax import config_checks
  if config_checks.is_fgm(base_config):  # a distill config names its teacher's config
    base_config = base_config.teacher
  config = base_config.copy_and_resolve_references()
  image_size, _ = _image_geometry(config)
  arch = keys_lib.infer_architecture(shapes, image_size)
  with config.unlocked():
    config.job = "train"
    if arch:
      config.model.update(arch)
  try:
    keys_lib.check_model_config(config.model)
  except ValueError as e:
    raise config_checks.ConfigError(str(e)) from None
  return config, arch


def _image_geometry(config):
  shape = tuple(config.data.shape)
  return shape[0], shape[-1]


def _teacher_state(params, config, step: int):
  """The TeacherState our teacher job saves, with ``params`` in both weight slots."""
  import jax
  import jax.numpy as jnp
  from fgm_jax.train import optim
  from fgm_jax.train import state as state_lib
  params = jax.device_put(params, jax.devices("cpu")[0])
  tx = optim.make_optimizer(config.optim)
  return state_lib.TeacherState(step=jnp.asarray(step, jnp.int32), params=params,
                                opt_state=tx.init(params), ema_params=params)


def _check_against_model(params, config, source_count: int):
  """Our tree has exactly the shapes our model initialises and the source's parameter count."""
  import jax
  import jax.numpy as jnp
  from fgm_jax import models
  size, channels = _image_geometry(config)
  x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  want = common.shape_tree(jax.eval_shape(models.build(config.model).init, jax.random.key(0),
                                          x, t)["params"])
  got = common.shape_tree(params)
  if want != got:  # a bug in the key table, not a user error
    diff = sorted(set(want.items()) ^ set(got.items()))[:6]
    raise AssertionError(f"converted tree differs from the model's: {diff}")
  count = sum(int(np.prod(s)) for s in got.values())
  if count != source_count:
    raise AssertionError(f"converted {count:,} parameters from {source_count:,}")
  return count, len(got)


# --------------------------------------------------------------------------------------------
# The conversion.


def convert(checkpoint_path: str, workdir: str, teacher_config, weights: str = "ema",
            log: Callable[[str], None] = print) -> dict:
  """Converts ``checkpoint_path`` into the teacher workdir ``workdir``; returns the provenance.

  ``teacher_config``: the teacher run config to follow (configs/cifar10_teacher.py:rf_teacher
  for CIFAR-10); its model fields nf / ch_mult / blocks / attention are replaced by what the
  checkpoint holds.
  """
  from fgm_jax import checkpoint
  from fgm_jax import workdir_lock
  from fgm_jax.train import run_dir
  if weights not in WEIGHTS:
    raise common.ConversionError(f"--weights={weights!r}: choose 'ema' (what RectifiedFlow "
                                 "samples with) or 'model' (the raw training weights).")
  path = os.path.abspath(os.fspath(checkpoint_path))
  ckpt_dir = checkpoint.checkpoint_dir(workdir)
  existing = checkpoint.latest_step(ckpt_dir)
  if existing is not None:
    raise common.ConversionError(f"{workdir!r} already holds a checkpoint (step {existing}); "
                                 "import into a new, empty folder.")
  ckpt = load_checkpoint(path)
  size_mb = os.path.getsize(path) / 1e6
  tensors = model_tensors(ckpt)
  names = parameter_names(tensors)
  step = int(ckpt.get("step", 0))
  dropped = {k: f"{str(v.dtype).replace('torch.', '')}{list(v.shape)}"
             for k, v in tensors.items() if k in BUFFERS}
  ema = ckpt.get("ema") if isinstance(ckpt.get("ema"), Mapping) else {}
  log(f"read {path} ({size_mb:,.1f} MB): step {step}, {len(names)} parameter tensors"
      + (f", buffers dropped: {', '.join(dropped)}" if dropped else "")
      + (f", EMA of {len(ema.get('shadow_params') or [])} tensors (decay {ema.get('decay')}, "
         f"{ema.get('num_updates')} updates)" if ema else ", no EMA")
      + (", optimizer state not imported" if "optimizer" in ckpt else ""))
  chosen = ema_tensors(ckpt, names, path) if weights == "ema" else {n: tensors[n] for n in names}
  state = {n: _numpy(v) for n, v in chosen.items()}
  del ckpt, tensors, chosen
  source_count = sum(int(v.size) for v in state.values())

  config, arch = teacher_config_for(teacher_config, {k: v.shape for k, v in state.items()})
  m = config.model
  described = (f"nf={m.model_channels} ch_mult={tuple(m.channel_mult)} "
               f"num_res_blocks={m.num_blocks} attention at {tuple(m.attn_resolutions)}")
  log(f"architecture {'read from the module list' if arch else 'from the config'}: "
      f"{described}")
  size, channels = _image_geometry(config)
  params = keys_lib.params_from_state(state, m, size, channels,
                                      what=f"the network the config describes ({described})")
  count, leaves = _check_against_model(params, config, source_count)
  chose = ("EMA (what RectifiedFlow samples with; --weights=model for the raw ones)"
           if weights == "ema" else
           "raw model weights (--weights=ema for the EMA RectifiedFlow samples with)")
  log(f"weights: {chose}; {count:,} parameters, {len(state)} tensors -> {leaves} of ours "
      "(q, k, v merged into qkv)")

  digest = common.sha256(path)
  provenance = {
      "source": path, "sha256": digest, "size_bytes": os.path.getsize(path),
      "format": "RectifiedFlow / score_sde training checkpoint (torch.save dict)",
      "weights": weights, "step": step, "parameters": count, "source_tensors": len(state),
      "ema": {"decay": ema.get("decay"), "num_updates": ema.get("num_updates")} if ema else None,
      "architecture": {"model_channels": m.model_channels,
                       "channel_mult": list(m.channel_mult), "num_blocks": m.num_blocks,
                       "attn_resolutions": list(m.attn_resolutions),
                       "inferred_from_checkpoint": bool(arch)},
      "dropped": dropped, "optimizer": "not imported (the saved optimizer state is fresh)",
      "time_convention": "v(x, t) = -u(x, 999 (1 - t)); t = 0 data, t = 1 noise",
      "converter": "fgm_jax.convert.rectified_flow",
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  teacher_state = _teacher_state(params, config, step)
  with workdir_lock.held(workdir):
    run_dir.prepare_workdir(config, workdir)
    mgr = checkpoint.manager(ckpt_dir, async_save=False)
    # The metadata our teacher job saves with each checkpoint, plus where this one came from.
    meta = dict(run_dir.meta(config, step), imported_from=provenance)
    checkpoint.save(mgr, step, teacher_state, meta, force=True)
    mgr.wait_until_finished()
    mgr.close()
    checkpoint.write_json(os.path.join(os.fspath(workdir), PROVENANCE_NAME), provenance)
  log(f"wrote {os.path.join(ckpt_dir, str(step))} (teacher state, step {step}), "
      f"{os.path.join(workdir, 'config.json')} and {os.path.join(workdir, PROVENANCE_NAME)} "
      f"(sha256 {digest[:16]}...)")
  return provenance


# --------------------------------------------------------------------------------------------
# Command line.


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file(
      "config", DEFAULT_CONFIG, "Teacher config the checkpoint is imported as (its data "
      "shape, time convention and optimizer; the architecture is read off the checkpoint).",
      lock_config=False)
  flags.DEFINE_enum("weights", "ema", list(WEIGHTS),
                    "'ema': the EMA weights RectifiedFlow's evaluation samples with; "
                    "'model': the raw training weights.")
  return flags.FLAGS


def _main(argv):
  from absl import app
  from absl import logging
  from fgm_jax import config_checks
  from fgm_jax import workdir_lock
  if len(argv) != 3:
    raise app.UsageError("usage: python -m fgm_jax.convert.rectified_flow CHECKPOINT.pth "
                         "OUT_WORKDIR [--weights=ema|model] [--config=...]")
  logging.set_verbosity(logging.WARNING)  # orbax's per-file INFO lines; progress is printed
  flags = _FLAGS
  try:
    config = flags.config.copy_and_resolve_references()  # loads it now
  except OSError as e:  # config_flags loads the file lazily, relative to the current folder
    print(f"error: --config could not be loaded ({str(e).splitlines()[-1].strip()}); run from "
          f"the repository root (the default is {DEFAULT_CONFIG}) or pass "
          "--config=<path to>/configs/cifar10_teacher.py:rf_teacher.", file=sys.stderr)
    sys.exit(2)
  try:
    convert(argv[1], argv[2], config, weights=flags.weights)
  except (common.ConversionError, FileNotFoundError, config_checks.ConfigError,
          workdir_lock.WorkdirLockedError) as e:
    print(f"error: {e}", file=sys.stderr)  # a user error: one message, no traceback
    sys.exit(2)


_FLAGS: Optional[object] = None

if __name__ == "__main__":
  from absl import app as _app
  _FLAGS = _define_flags()
  _app.run(_main)
