"""Lazy name -> factory lookup shared by the model and data registries.

Factories are named as "module:function" strings and imported on first use, so a toy run
never pays for importing the U-Net, MM-DiT or TensorFlow-backed code.
"""

import importlib


def resolve(registry: dict, name: str, field: str):
  """The factory registered under ``name``; ``field`` names the config entry in errors."""
  if name not in registry:
    raise ValueError(f"{field}={name!r} is not known; choose one of {sorted(registry)}.")
  module_name, factory = registry[name].split(":")
  return getattr(importlib.import_module(module_name), factory)
