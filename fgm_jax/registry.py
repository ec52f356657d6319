"""Lazy name -> factory lookup shared by the model, data and evaluator registries.

Factories are named as "module:function" strings and imported on first use, so a toy run
never pays for importing the U-Net, MM-DiT or TensorFlow-backed code.
"""

import importlib


def module(registry: dict, name: str, field: str):
  """The module registered under ``name``; ``field`` names the config entry in errors."""
  if name not in registry:
    raise ValueError(f"{field}={name!r} is not known; choose one of {sorted(registry)}.")
  return importlib.import_module(registry[name].split(":")[0])


def resolve(registry: dict, name: str, field: str):
  """The factory registered under ``name``."""
  return getattr(module(registry, name, field), registry[name].split(":")[1])
