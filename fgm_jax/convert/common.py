"""Generic helpers for moving weights between PyTorch layouts and Flax params trees.

Layout facts the converters rely on:

* ``torch.nn.Linear.weight`` is (out, in); a Flax ``Dense`` kernel is (in, out).
* ``torch.nn.Conv2d.weight`` is OIHW; a Flax ``Conv`` kernel is HWIO.
* Biases, norm scales and embeddings keep their layout.

Params trees are nested dicts of arrays. A "flat" mapping uses tuple paths
(``("blocks_0", "attn", "to_q", "kernel")``) as keys (fgm_jax/params_tree.py).
"""

import hashlib
import pickle
import re
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

import numpy as np

# The tree helpers live one floor down (evaluation and export use them too); re-exported here
# because every converter reads them as common.*.
from fgm_jax.params_tree import (  # pylint: disable=unused-import
    ConversionError, Path, flatten, path_str, shape_tree, unflatten)

# ----------------------------------------------------------------------------- layouts


def linear_to_dense(w):
  """torch Linear weight (out, in) -> Flax Dense kernel (in, out)."""
  _check_ndim(w, 2, "Linear weight")
  return np.asarray(w).T


def dense_to_linear(k):
  """Flax Dense kernel (in, out) -> torch Linear weight (out, in)."""
  _check_ndim(k, 2, "Dense kernel")
  return np.ascontiguousarray(np.asarray(k).T)


def conv_to_flax(w):
  """torch Conv2d weight OIHW -> Flax Conv kernel HWIO."""
  _check_ndim(w, 4, "Conv2d weight")
  return np.transpose(np.asarray(w), (2, 3, 1, 0))


def conv_to_torch(k):
  """Flax Conv kernel HWIO -> torch Conv2d weight OIHW."""
  _check_ndim(k, 4, "Conv kernel")
  return np.ascontiguousarray(np.transpose(np.asarray(k), (3, 2, 0, 1)))


def identity(a):
  return np.asarray(a)


def _check_ndim(a, ndim, what):
  if np.ndim(a) != ndim:
    raise ValueError(f"{what} must have {ndim} dims, got shape {np.shape(a)}.")


# ------------------------------------------------------------------- reading foreign files


def sha256(path: str, chunk: int = 1 << 24) -> str:
  """Hex sha256 of a file (provenance of converted weights)."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(chunk), b""):
      digest.update(block)
  return digest.hexdigest()


def refused_object(error) -> str:
  """The object torch's weights-only unpickler named, e.g. 'GLOBAL argparse.Namespace'."""
  found = re.search(r"Unsupported (?:global|operand)[^:\n]*: (.+?)(?: was not.*)?$",
                    str(error), re.MULTILINE)
  return found.group(1).strip() if found else str(error).strip().splitlines()[0][:120]


def load_torch_file(path: str, *, pickled_hint: str, unreadable_hint: str):
  """``torch.load(path, map_location='cpu', weights_only=True)`` with one-line errors.

  User files are never unpickled (that can run code): a file that weights_only refuses, or
  that is not a torch file at all, raises ConversionError naming the refused object and the
  caller's hint for the fix.
  """
  try:
    import torch
  except ImportError:
    raise ConversionError("Converting a PyTorch file needs torch: pip install torch==2.13.0 "
                          "(the CPU build is enough).") from None
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise ConversionError(
        f"{path!r} holds pickled Python objects that torch.load(weights_only=True) refuses "
        f"({refused_object(e)}); we never unpickle user files (that can run code). "
        f"{pickled_hint}") from None
  except Exception as e:  # pylint: disable=broad-except  (truncated download, other format)
    first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
    raise ConversionError(f"{path!r} is not a readable PyTorch file ({type(e).__name__}: "
                          f"{first}). {unreadable_hint}") from None


def fill_params(expected: Mapping[Path, Tuple[int, ...]],
                values: Mapping[Path, Any],
                sources: Optional[Mapping[Path, str]] = None,
                unexpected_sources: Iterable[str] = (),
                dtype=None,
                hint: str = "",
                source_shapes: Optional[Mapping[Path, Tuple[int, ...]]] = None
                ) -> Dict[str, Any]:
  """Builds a params tree with exactly the ``expected`` paths and shapes.

  Args:
    expected: {flax path: shape} the model wants (e.g. from ``shape_tree`` of an
      ``jax.eval_shape``'d init).
    values: {flax path: array} produced by a converter.
    sources: {flax path: source (torch) name}, used in messages so users can find the
      offending tensor in their checkpoint.
    unexpected_sources: source names the converter could not map to any flax path.
    dtype: optional numpy/jax dtype to cast every leaf to.
    hint: extra advice appended to the error message.
    source_shapes: {flax path: shape as stored in the file}, shown beside mismatches.

  Returns:
    A nested dict params tree.

  Raises:
    ConversionError listing ALL missing keys, unexpected keys and shape mismatches.
  """
  sources = dict(sources or {})
  name = lambda p: f"{sources[p]} (-> {path_str(p)})" if p in sources else path_str(p)

  missing = [p for p in expected if p not in values]
  unexpected = [name(p) for p in values if p not in expected]
  unexpected += list(unexpected_sources)
  file_shapes = dict(source_shapes or {})
  got = lambda p: str(tuple(np.shape(values[p]))) + (
      f" (stored as {tuple(file_shapes[p])})" if p in file_shapes else "")
  mismatched = [(name(p), tuple(expected[p]), got(p))
                for p in expected if p in values
                and tuple(np.shape(values[p])) != tuple(expected[p])]

  if missing or unexpected or mismatched:
    raise ConversionError(format_problems(
        missing=[(name(p), tuple(expected[p])) for p in missing],
        unexpected=unexpected, mismatched=mismatched, hint=hint))

  cast = (lambda a: np.asarray(a, dtype=dtype)) if dtype is not None else np.asarray
  return unflatten({p: cast(values[p]) for p in expected})


def format_problems(missing=(), unexpected=(), mismatched=(), hint="") -> str:
  """One readable message for every problem found while converting weights."""
  lines = ["Weights do not match the model:"]
  if missing:
    lines.append(f"  {len(missing)} missing key(s) (the model needs them, the weights lack them):")
    lines += [f"    {k}  expected shape {s}" for k, s in missing]
  if unexpected:
    lines.append(f"  {len(unexpected)} unexpected key(s) (in the weights, unused by the model):")
    lines += [f"    {k}" for k in unexpected]
  if mismatched:
    lines.append(f"  {len(mismatched)} shape mismatch(es) (shapes in Flax layout: Dense "
                 "kernels are torch weights transposed, conv kernels HWIO):")
    lines += [f"    {k}  expected shape {e}, got shape {g}" for k, e, g in mismatched]
  lines.append(
      "  How to fix: check that config.json describes these weights (layer count, head "
      "count/dim, patch size, channels, qk_norm, dual_attention_layers ...) and that the "
      "folder holds the weights of the same model.")
  if hint:
    lines.append("  " + hint)
  return "\n".join(lines)


def apply_rules(state: Mapping[str, Any],
                rules: Iterable[Tuple[str, Path, Callable[[Any], Any]]]
                ) -> Tuple[Dict[Path, Any], Dict[Path, str], list]:
  """Applies exact-name rules (source name, flax path, transform) to a state dict.

  Returns ({flax path: array}, {flax path: source name}, [source names not consumed]).
  Rules whose source name is absent are skipped; ``fill_params`` then reports the
  flax path as missing, under its source name.
  """
  values, sources, used = {}, {}, set()
  for src, dst, fn in rules:
    sources[dst] = src
    if src in state:
      try:
        values[dst] = fn(state[src])
      except ValueError:
        # Wrong rank: keep the raw array so fill_params reports it with the others.
        values[dst] = np.asarray(state[src])
      used.add(src)
  leftover = sorted(k for k in state if k not in used)
  return values, sources, leftover


def stored_shapes(state: Mapping[str, Any], rules) -> Dict[Path, Tuple[int, ...]]:
  """{flax path: shape in the file} for the rules' sources present in ``state``."""
  return {dst: tuple(np.shape(state[src])) for src, dst, _ in rules if src in state}
