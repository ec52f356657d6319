"""Whether a workdir's checkpoint fits a config: the fingerprint saved beside each checkpoint
(train/run_dir.py) and the comparison that refuses an incompatible one, next to checkpoint.py.
"""

import os

from fgm_jax import checkpoint
from fgm_jax import config_checks
from fgm_jax.config_checks import ConfigError
from fgm_jax.train import optim


def compare_with_saved(config, saved: dict, workdir: str):
  """Stops when ``workdir`` holds a checkpoint from a config whose state would not fit."""
  prefix = "config.teacher" if config_checks.is_fgm(config) else "config"
  diffs = _diff(_without_free_fields(saved.get("fingerprint", {})), fingerprint(config),
                prefix)
  if diffs:
    lines = "\n  ".join(diffs)
    raise ConfigError(
        f"--workdir={workdir} holds a checkpoint from an incompatible config:\n  {lines}\n"
        "Use a new --workdir for this config, or set those fields back to the saved values "
        f"(the saved config is {os.path.join(workdir, 'config.json')}).")


# Fields that change how a state is computed or where data is read, not what the state
# holds: a float32 teacher distils in bfloat16, a run moves to another data folder. (image_key
# and label_key joined the tfds configs later: runs saved before them still resume.)
NOT_IN_FINGERPRINT = {"model": ("dtype", "remat", "attention_impl"),
                      "data": ("data_dir", "manual_dir", "image_key", "label_key")}


def fingerprint(config) -> dict:
  model, data = config_checks.architecture(config)
  fp = {"kind": config_checks.run_kind(config), "model": model.to_dict(), "data": data.to_dict()}
  if "lora" in config and config.lora.rank:  # adapters, not networks (absent: older runs fit)
    fp["lora"] = {"rank": config.lora.rank, "targets": list(config.lora.targets)}
  return _without_free_fields(fp)


# Checkpoint kinds saved before the FGM run had that name (the job was called 'distill').
LEGACY_KINDS = {"distill": "fgm"}


def _without_free_fields(fp: dict) -> dict:
  if "kind" in fp:
    fp = {**fp, "kind": LEGACY_KINDS.get(fp["kind"], fp["kind"])}
  return {k: ({f: v for f, v in part.items() if f not in NOT_IN_FINGERPRINT.get(k, ())}
              if isinstance(part, dict) else part) for k, part in fp.items()}


def _diff(saved, current, prefix="config"):
  out = []
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
    name = {"kind": "checkpoint kind", "lora": "config.lora"}.get(key, f"{prefix}.{key}")
    if isinstance(a, dict) and isinstance(b, dict):
      out += _diff(a, b, name)
    elif _norm(a) != _norm(b):
      out.append(f"{name}: checkpoint has {a!r}, this config has {b!r}")
  return out


def _norm(v):
  return list(v) if isinstance(v, tuple) else v


def check_first_stage(config):
  """A fine-tuning stage (config.fgm.init_generator='run') stops with one line unless
  config.fgm.init_run is a finished FGM run of this architecture that keeps the weights
  config.fgm.init_weights; other runs have nothing to check."""
  if not config_checks.is_fgm(config) or config.fgm.init_generator != "run":
    return
  f = config.fgm
  field = f"config.fgm.init_run={f.init_run!r}"
  ckpt_dir = checkpoint.checkpoint_dir(f.init_run)
  step = checkpoint.latest_step(ckpt_dir)
  if step is None:
    raise ConfigError(f"{field}: no checkpoint in {ckpt_dir}; point it at the --workdir of "
                      "the finished FGM run whose generator this run fine-tunes.")
  saved = checkpoint.read_meta(ckpt_dir, step)
  first = saved.get("config", {})
  if step < first.get("num_steps", step):
    raise ConfigError(f"{field}: its newest checkpoint is step {step} of its "
                      f"{first['num_steps']}; finish that run first (rerun it with its "
                      "--workdir), or point init_run at a finished one.")
  diffs = _diff(_without_free_fields(saved.get("fingerprint", {})), fingerprint(config),
                "config.teacher")
  if diffs:
    raise ConfigError(f"{field} holds a generator of another architecture ({diffs[0]}); "
                      "fine-tune with that run's teacher and model.")
  extra = first.get("optim", {}).get("extra_ema_decays", ())
  names = ["ema", "raw", *(optim.ema_name(d) for d in extra)]
  if f.init_weights not in names:
    raise ConfigError(f"config.fgm.init_weights={f.init_weights!r}: the run at "
                      f"{f.init_run!r} keeps {names}; choose one of them.")
