"""The environment `pip install -e ".[EXTRA]"` gives, made in a second from the test one's files.

Why: the test environment (requirements-test.txt) holds everything an extra installs, and more:
torchvision 0.28.0 for pytorch-fid, whose compiled ops do not load beside the CPU torch, so
outside pytest's hook (tests/torchvision_without_ops.py) transformers' models and diffusers'
pipelines do not import there. Users install an extra instead (README: `.[diffusers]`, which
leaves torchvision out). Checking that install honestly means running it in an interpreter
that sees exactly the extra's packages, without the hook. A fresh venv plus `pip install`
would take minutes of the suite's 12 (jax, TensorFlow, torch); this builds the same set of
packages from the files already installed:

* the extra's requirements are read from the sources pip reads (pyproject.toml's
  optional-dependencies, and requirements.txt, its dynamic dependencies), with fgm_jax itself;
* their closure is followed through each installed distribution's metadata (markers and
  extras evaluated as pip does), and every requirement must be met by the installed version:
  a pin of the extra that the test environment does not satisfy fails here, so the set is one
  pip can install (the same versions, where pip might pick newer ones for unpinned packages);
* a new venv (`python -m venv --without-pip`, no system or user site) gets a site-packages of
  symbolic links to those distributions' files (from their RECORDs), nothing else: no
  torchvision, pytest, pytorch-fid, libtpu. Its interpreter runs with the ordinary `site`,
  which also reads the editable install's .pth (fgm_jax from this checkout).
"""

import importlib.metadata
import os
import re
import subprocess
import sys
import sysconfig

try:
  import tomllib
except ModuleNotFoundError:  # Python 3.10: the TOML reader pip itself uses
  from pip._vendor import tomli as tomllib

from packaging.markers import Marker
from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _canonical(name):
  return re.sub(r"[-_.]+", "-", name).lower()


def _file_requirements(path):
  """Requirement lines of a requirements file as setuptools' `file` directive reads them."""
  with open(path) as f:
    lines = [line.split("#", 1)[0].strip() for line in f]
  return [Requirement(line) for line in lines if line and not line.startswith("-")]


def extra_requirements(extra, root=ROOT):
  """What `pip install -e "<root>[extra]"` asks for: the dependencies and the extra's."""
  with open(os.path.join(root, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)
  optional = project["project"].get("optional-dependencies", {})
  if extra not in optional:
    raise KeyError(f"pyproject.toml has no optional-dependencies.{extra}")
  files = project["tool"]["setuptools"]["dynamic"]["dependencies"]["file"]
  deps = [r for name in files for r in _file_requirements(os.path.join(root, name))]
  name = project["project"]["name"]
  return [Requirement(name)] + deps + [Requirement(r) for r in optional[extra]]


def _installed(site):
  """{canonical name: Distribution} of ``site`` alone (not the checkout's fgm_jax.egg-info,
  which pytest's pythonpath puts first on sys.path)."""
  return {_canonical(d.metadata["Name"]): d
          for d in importlib.metadata.distributions(path=[site])}


def closure(extra, site, root=ROOT):
  """{canonical name: installed Distribution} of everything the extra installs, from the
  distributions in ``site``. Raises AssertionError when a requirement is not installed or
  its installed version does not meet it."""
  installed = _installed(site)
  found, expanded = {}, set()
  todo = [r for r in extra_requirements(extra, root)
          if r.marker is None or r.marker.evaluate({"extra": ""})]
  while todo:
    req = todo.pop()
    key = _canonical(req.name)
    dist = installed.get(key)
    if dist is None:
      raise AssertionError(f"{req} (in the [{extra}] extra's closure) is not installed in "
                           "the test environment")
    if not req.specifier.contains(dist.version, prereleases=True):
      raise AssertionError(f"the [{extra}] extra's closure needs {req}; the test "
                           f"environment has {dist.metadata['Name']} {dist.version}")
    found[key] = dist
    for e in [""] + sorted(req.extras):
      if (key, e) in expanded:
        continue
      expanded.add((key, e))
      for sub in map(Requirement, dist.requires or []):
        if sub.marker is None or sub.marker.evaluate({"extra": e}):
          todo.append(sub)
  return found


def _owner_tree(site):
  """A tree of path components under ``site``: node = {"owners": set, "children": {}}."""
  tree = {"owners": set(), "children": {}}
  for dist in importlib.metadata.distributions(path=[site]):
    name = _canonical(dist.metadata["Name"])
    if dist.files is None:
      raise AssertionError(f"{name} has no RECORD: cannot tell its files apart")
    for path in dist.files:
      parts = path.parts
      if not parts or parts[0] == "..":  # console scripts in bin/
        continue
      node = tree
      for part in parts:
        node = node["children"].setdefault(part, {"owners": set(), "children": {}})
        node["owners"].add(name)
  return tree


def _link(node, src, dst, keep):
  for part, child in node["children"].items():
    owners = child["owners"]
    if not owners & keep:
      continue
    s, d = os.path.join(src, part), os.path.join(dst, part)
    if owners <= keep or not child["children"]:
      if os.path.lexists(s):
        os.symlink(s, d)
    else:  # a folder shared with packages left out (a namespace package, __pycache__)
      os.makedirs(d, exist_ok=True)
      _link(child, s, d, keep)


def build(path, extra, root=ROOT):
  """A venv at ``path`` holding exactly the [extra] closure; returns (its python, the
  {name: version} it holds)."""
  site = sysconfig.get_paths()["purelib"]
  dists = closure(extra, site, root)
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", path], check=True)
  python = os.path.join(path, "bin", "python")
  target = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], check=True, capture_output=True,
                          text=True).stdout.strip()
  os.makedirs(target, exist_ok=True)
  _link(_owner_tree(site), site, target, set(dists))
  return python, {k: d.version for k, d in dists.items()}


def clean_env():
  """os.environ without what would put this checkout or pytest's setup on the path."""
  env = dict(os.environ)
  for key in ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME", "PYTHONSAFEPATH", "VIRTUAL_ENV"):
    env.pop(key, None)
  return env


# Run by the venv's interpreter in isolated mode (-I: no PYTHON* variables, no user site, no
# script folder or working directory on sys.path), as a user's script would run it.
_SD3_ONE_STEP = r'''
import importlib.util, json, sys
import numpy as np
import torch
import diffusers, transformers
from diffusers import StableDiffusion3Pipeline

args = json.loads(sys.argv[1])
pipe = StableDiffusion3Pipeline.from_pretrained(args["folder"])
if args["lora"]:  # diffusers' SD3 LoRA file over the folder's transformer (needs peft)
  pipe.load_lora_weights(args["lora"])
kwargs = dict(prompt=args["prompts"], num_inference_steps=1, guidance_scale=1.0,
              latents=torch.from_numpy(np.load(args["noise"])).permute(0, 3, 1, 2),
              **args["kwargs"])
with torch.no_grad():
  latents = pipe(output_type="latent", **kwargs).images.permute(0, 2, 3, 1).numpy()
  images = pipe(output_type="np", **kwargs).images
np.savez(args["out"], latents=latents, images=images)
json.dump({"versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                        "transformers": transformers.__version__},
           "torchvision": importlib.util.find_spec("torchvision") is not None,
           "modules": sorted(m for m in sys.modules if m.split(".")[0] in
                             ("tests", "torchvision", "pytest", "_pytest"))},
          open(args["out"] + ".json", "w"))
'''


def sd3_one_step(python, folder, prompts, noise, workdir, lora=None, **kwargs):
  """Runs the SD3 folder in StableDiffusion3Pipeline (1 step, guidance 1) in ``python``'s
  environment from initial ``noise`` (n, h, w, c), with the LoRA file ``lora`` loaded onto
  its transformer when given (load_lora_weights); returns (latents (n, h, w, c), images
  (n, H, W, 3), {"versions", "torchvision" (importable), "modules" (of pytest, tests/ or
  torchvision loaded)})."""
  import json
  import numpy as np
  out = os.path.join(workdir, "sd3_one_step")
  np.save(out + "_noise.npy", np.asarray(noise, np.float32))
  args = dict(folder=os.path.abspath(folder), prompts=list(prompts), kwargs=kwargs,
              noise=out + "_noise.npy", out=out + ".npz",
              lora=os.path.abspath(lora) if lora else None)
  run = subprocess.run([python, "-I", "-c", _SD3_ONE_STEP, json.dumps(args)], cwd=workdir,
                       env=clean_env(), capture_output=True, text=True, timeout=600)
  if run.returncode:
    raise AssertionError(f"diffusers in the extra's environment failed:\n{run.stderr[-3000:]}")
  with np.load(out + ".npz") as f, open(out + ".npz.json") as j:
    return f["latents"], f["images"], json.load(j)
