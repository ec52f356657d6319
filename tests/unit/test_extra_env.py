"""tests/extra_env.py: the package set of an extra, read from pyproject.toml as pip reads it.

The SD3 export test runs the exported folder in the [diffusers] extra's environment
(tests/integration/test_sd3_fgm.py); these check that the environment is the extra's and nothing else,
and that a pin the test environment does not meet stops the build instead of testing
other versions."""

import os
import shutil
import sysconfig

import pytest

from tests import extra_env

SITE = sysconfig.get_paths()["purelib"]


def test_diffusers_extra_is_torch_diffusers_and_the_runtime_without_torchvision():
  names = extra_env.closure("diffusers", SITE)
  for name in ("fgm-jax", "jax", "flax", "transformers", "tokenizers", "torch", "diffusers",
               "huggingface-hub", "safetensors"):
    assert name in names, name
  # In the test environment, not in the extra (torchvision breaks diffusers outside pytest).
  for name in ("torchvision", "pytorch-fid", "pytest", "pytest-xdist", "libtpu", "chex"):
    assert name not in names, name
  assert names["torch"].version.startswith("2.13.0")


def _root_with_extra(tmp_path, pins):
  root = tmp_path / "root"
  root.mkdir(parents=True)
  shutil.copy(os.path.join(extra_env.ROOT, "requirements.txt"), root)
  text = open(os.path.join(extra_env.ROOT, "pyproject.toml")).read()
  text = text.replace("[project.optional-dependencies]",
                      "[project.optional-dependencies]\nprobe = [%s]"
                      % ", ".join(f'"{p}"' for p in pins), 1)
  (root / "pyproject.toml").write_text(text)
  return str(root)


def test_a_pin_the_test_environment_does_not_meet_stops_the_build(tmp_path):
  root = _root_with_extra(tmp_path, ["torch==2.12.0"])
  with pytest.raises(AssertionError, match=r"torch==2\.12\.0.*has torch 2\.13\.0"):
    extra_env.closure("probe", SITE, root)
  root = _root_with_extra(tmp_path / "b", ["not-a-package-here==1.0"])
  with pytest.raises(AssertionError, match="not-a-package-here==1.0.*not installed"):
    extra_env.build(str(tmp_path / "venv"), "probe", root)
  with pytest.raises(KeyError, match="no optional-dependencies.absent"):
    extra_env.closure("absent", SITE)


def test_venv_holds_the_closure_only(tmp_path):
  """A tiny extra (no torch): the venv's interpreter finds its packages and not the others."""
  import subprocess
  root = _root_with_extra(tmp_path, ["safetensors"])
  python, versions = extra_env.build(str(tmp_path / "venv"), "probe", root)
  assert "safetensors" in versions and "torch" not in versions
  probe = ("import importlib.util as u; print(*(u.find_spec(m) is not None for m in "
           "('safetensors', 'jax', 'fgm_jax', 'torch', 'torchvision', 'pytest')))")
  out = subprocess.run([python, "-I", "-c", probe], capture_output=True, text=True,
                       check=True, cwd=str(tmp_path), env=extra_env.clean_env()).stdout
  assert out.split() == ["True", "True", "True", "False", "False", "False"]
