"""Lets PyPI's torchvision import beside the CPU-only torch this project pins.

Why: the parity reference for the FID Inception is pytorch-fid, which subclasses
torchvision's Inception blocks, so requirements-test.txt installs torchvision. The one that
fits ``torch==2.13.0`` (0.28.0) is built against PyPI's CUDA torch: its compiled ops
(``torchvision/_C.so``: nms, roi_align, ...) need ``libtorch_cuda.so`` and do not load beside
the CPU build. torchvision itself tolerates that (``extension._has_ops()`` turns False),
except ``torchvision/_meta_registrations.py``, which registers fake-tensor kernels for those
ops unconditionally and fails with "operator torchvision::nms does not exist". That breaks
``import torchvision``, and with it every ``import transformers`` model and diffusers
pipeline, since they import torchvision whenever it is installed.

``install()`` (called by tests/conftest.py before anything imports torchvision) adds an
import hook that, only when the compiled ops failed to load, replaces that one module with
an empty one. Nothing the suite uses needs it: its kernels describe the detection ops'
output shapes for torch.compile. The pure-Python parts (models, transforms) are the real
torchvision. With working ops (a CUDA torch) the hook steps aside.

Outside pytest, in a virtual environment made from requirements-test.txt, ``import
torchvision`` (and so transformers' models and diffusers' pipelines) still fails; fgm_jax
itself needs neither (it uses transformers' tokenizers only, which do not import it). Users
run exported SD3 folders in diffusers with the `[diffusers]` extra, which leaves torchvision
out (README); tests/extra_env.py tests that environment without this hook.
"""

import importlib.abc
import importlib.machinery
import sys

_MODULE = "torchvision._meta_registrations"


class _EmptyModule(importlib.abc.Loader):

  def create_module(self, spec):
    return None  # the default module object

  def exec_module(self, module):
    module.__doc__ = ("Left empty by tests/torchvision_without_ops.py: torchvision's compiled "
                      "ops did not load, so there are no kernels to register.")


class _SkipMetaRegistrationsWithoutOps(importlib.abc.MetaPathFinder):

  def find_spec(self, name, path=None, target=None):
    if name != _MODULE:
      return None
    # torchvision/__init__.py imports .extension (which tries to load _C.so) first.
    extension = sys.modules.get("torchvision.extension")
    has_ops = getattr(extension, "_has_ops", lambda: True)
    if extension is None or has_ops():
      return None  # the ordinary finders load the real module
    return importlib.machinery.ModuleSpec(name, _EmptyModule())


def install():
  """Adds the hook once; cheap (imports neither torch nor torchvision)."""
  if not any(isinstance(f, _SkipMetaRegistrationsWithoutOps) for f in sys.meta_path):
    sys.meta_path.insert(0, _SkipMetaRegistrationsWithoutOps())
