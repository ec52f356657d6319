"""pytorch-fid's Inception weights (.pth) -> the safetensors file fgm_jax's FID reads.

    python -m fgm_jax.convert.inception pt_inception-2015-12-05-6726825d.pth fid_inception.safetensors

The input is pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (about 95.6 MB, from
pytorch-fid's GitHub release 'fid_weights'): a plain state dict of torchvision's Inception3
with pytorch-fid's FID blocks, read with ``torch.load(weights_only=True)``, so loading it
runs no code. This one-off command is the only place torch is needed; evaluation reads the
output with ``fgm_jax.evaluation.inception.load_params``.

Key mapping, for each of the 94 BasicConv2d modules ``M`` (``Conv2d_1a_3x3``,
``Mixed_6b.branch7x7dbl_3``, ...; ``/`` below joins the same names):

    M.conv.weight        (O, I, kh, kw)  -> params/M/conv/kernel    (kh, kw, I, O)
    M.bn.weight / bias                   -> params/M/bn/scale / bias
    M.bn.running_mean / running_var      -> batch_stats/M/bn/mean / var
    M.bn.num_batches_tracked             ignored (a training counter)
    fc.weight, fc.bias, AuxLogits.*      ignored (the classifier heads; FID uses pool3)

Every other key, every missing key and every shape disagreement is reported in one error.
The output records the source file's sha256, and whether it is pytorch-fid's published
file (its name carries the first digits of that hash): FID from other weights is not
comparable with published numbers.
"""

import argparse
import os
import sys
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from fgm_jax.convert import common
from fgm_jax.evaluation import inception

Path = Tuple[str, ...]

# Keys the FID network does not use, dropped on purpose (anything else unmapped is an error).
IGNORED_PREFIXES = ("fc.", "AuxLogits.")
IGNORED_SUFFIXES = (".num_batches_tracked",)
FID_CLASSIFIER_SHAPE = (1008, 2048)

# Flax leaf -> torch parameter name inside a BasicConv2d module.
_LEAF_TO_TORCH = {
    ("params", "conv", "kernel"): "conv.weight",
    ("params", "bn", "scale"): "bn.weight",
    ("params", "bn", "bias"): "bn.bias",
    ("batch_stats", "bn", "mean"): "bn.running_mean",
    ("batch_stats", "bn", "var"): "bn.running_var",
}


def torch_name(path: Path) -> str:
  """('params', 'Mixed_5b', 'branch1x1', 'conv', 'kernel') -> 'Mixed_5b.branch1x1.conv.weight'."""
  collection, *modules, layer, leaf = path
  return ".".join(modules + [_LEAF_TO_TORCH[(collection, layer, leaf)]])


def is_ignored(key: str) -> bool:
  return key.startswith(IGNORED_PREFIXES) or key.endswith(IGNORED_SUFFIXES)


def _to_flax(path: Path, array):
  return common.conv_to_flax(array) if path[-1] == "kernel" else np.asarray(array)


def flax_variables(state: Mapping[str, np.ndarray]) -> Dict[str, Dict]:
  """{torch key: array} -> the FID Inception's variables; one ConversionError listing the
  first missing, unexpected and mis-shaped keys (torch names, torch layouts)."""
  _check_classifier(state)
  expected = inception.expected_shapes()
  names = {torch_name(p): p for p in expected}
  # Shapes are compared in torch's layout, so messages show what the file holds.
  want = {k: _torch_shape(p, expected[p]) for k, p in names.items()}
  got = {k: tuple(np.shape(v)) for k, v in state.items() if not is_ignored(k)}
  problems = inception.tree_problems({(k,): s for k, s in want.items()},
                                     {(k,): s for k, s in got.items()}, name=lambda p: p[0])
  if problems:
    raise common.ConversionError(
        "the state dict is not pytorch-fid's FID Inception-V3: " + " | ".join(problems)
        + f". Give pytorch-fid's {inception.FID_WEIGHTS_NAME} ({inception.FID_WEIGHTS_URL}).")
  flat = {p: np.asarray(_to_flax(p, state[k]), np.float32) for k, p in names.items()}
  return common.unflatten(flat)


def _check_classifier(state: Mapping[str, np.ndarray]) -> None:
  """torchvision's ImageNet Inception-V3 has the same trunk keys and shapes, but other
  weights: only its 1000-class head tells it apart (the FID graph has 1008 classes)."""
  fc = state.get("fc.weight")
  if fc is not None and tuple(np.shape(fc)) != FID_CLASSIFIER_SHAPE:
    raise common.ConversionError(
        f"fc.weight has shape {tuple(np.shape(fc))}, not the FID Inception's "
        f"{FID_CLASSIFIER_SHAPE} (the 2015 TF graph's 1008 classes): these look like another "
        f"Inception-V3 (torchvision's ImageNet one has 1000), whose features give FIDs not "
        f"comparable with published ones. Give pytorch-fid's {inception.FID_WEIGHTS_NAME} "
        f"({inception.FID_WEIGHTS_URL}).")


def _torch_shape(path: Path, flax_shape) -> Tuple[int, ...]:
  if path[-1] == "kernel":  # HWIO -> OIHW
    h, w, i, o = flax_shape
    return (o, i, h, w)
  return tuple(flax_shape)


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  """{key: float array} of a torch state-dict file, loaded without running its pickles."""
  import torch

  if not os.path.isfile(path):
    raise inception.InceptionWeightsNotFoundError(
        f"{path}: no such file. Give pytorch-fid's {inception.FID_WEIGHTS_NAME} "
        f"({inception.FID_WEIGHTS_SIZE}), from pytorch-fid's GitHub release 'fid_weights': "
        f"{inception.FID_WEIGHTS_URL}")
  state = common.load_torch_file(
      path,
      pickled_hint=f"Give a plain state dict such as pytorch-fid's {inception.FID_WEIGHTS_NAME}, "
      "or re-save yours with torch.save(model.state_dict(), path).",
      unreadable_hint=f"A partial download? pytorch-fid's {inception.FID_WEIGHTS_NAME} is "
      f"{inception.FID_WEIGHTS_SIZE}.")
  if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
    raise common.ConversionError(
        f"{path} holds a {type(state).__name__}, not a state dict of tensors; give "
        f"pytorch-fid's {inception.FID_WEIGHTS_NAME}.")
  return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()}


def convert(src: str, out: str) -> Dict[str, str]:
  """Converts ``src`` (.pth) to ``out`` (safetensors); returns the metadata written."""
  variables = flax_variables(read_state_dict(src))
  digest = common.sha256(src)
  meta = {
      "format": inception.FORMAT,
      "source_file": os.path.basename(src),
      "source_sha256": digest,
      "official": str(digest.startswith(inception.FID_WEIGHTS_SHA256_PREFIX)).lower(),
  }
  save_variables(variables, out, meta)
  return meta


def save_variables(variables, out: str, meta: Dict[str, str]) -> None:
  """Writes Inception variables as the safetensors file ``inception.load_params`` reads
  (also how tests and smoke runs store random weights: meta ``official`` 'false')."""
  import safetensors.numpy

  flat = {common.path_str(p): np.ascontiguousarray(v)
          for p, v in common.flatten(variables).items()}
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tmp = out + ".tmp"  # renamed when complete: a crash never leaves a plausible half file
  safetensors.numpy.save_file(flat, tmp, metadata={"format": inception.FORMAT, **meta})
  os.replace(tmp, out)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m fgm_jax.convert.inception",
      description="Convert pytorch-fid's FID Inception weights to safetensors for fgm_jax.")
  parser.add_argument("pth", help=f"pytorch-fid's {inception.FID_WEIGHTS_NAME}")
  parser.add_argument("out", help="the safetensors file to write")
  args = parser.parse_args(argv)
  try:
    meta = convert(args.pth, args.out)
  except (common.ConversionError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  count = sum(1 for _ in inception.expected_shapes())
  note = ("pytorch-fid's published weights" if meta["official"] == "true" else
          f"NOT pytorch-fid's published weights (sha256 {meta['source_sha256'][:8]}..., "
          f"expected {inception.FID_WEIGHTS_SHA256_PREFIX}...): FID will not be comparable "
          "with published numbers")
  print(f"wrote {args.out}: {count} tensors, {note}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
