"""Params trees as flat maps: nested dicts of arrays <-> {tuple path: leaf}.

Below ``convert/`` and ``evaluation/`` so both (and ``export``) can key weight files by path
without one importing the other. A path is ``("blocks_0", "attn", "to_q", "kernel")``;
``path_str`` renders it with '/', the key weight files use.
"""

from typing import Any, Dict, Mapping, Tuple

import numpy as np

Path = Tuple[str, ...]


class ConversionError(ValueError):
  """Raised when weights and the expected params tree disagree; lists every problem."""


def path_str(path: Path) -> str:
  return "/".join(path)


def flatten(tree: Mapping[str, Any], prefix: Path = ()) -> Dict[Path, Any]:
  """Nested dict -> {tuple path: leaf}."""
  out = {}
  for key, value in tree.items():
    path = prefix + (str(key),)
    if isinstance(value, Mapping):
      out.update(flatten(value, path))
    else:
      out[path] = value
  return out


def unflatten(flat: Mapping[Path, Any]) -> Dict[str, Any]:
  """{tuple path: leaf} -> nested dict."""
  tree: Dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def shape_tree(tree: Mapping[str, Any]) -> Dict[Path, Tuple[int, ...]]:
  """{path: shape} of a params tree (arrays or jax.ShapeDtypeStruct leaves)."""
  return {p: tuple(np.shape(v)) if not hasattr(v, "shape") else tuple(v.shape)
          for p, v in flatten(tree).items()}
