"""experiments/colab_tpu.ipynb runs from top to bottom (on the CPU, tiny sizes), so it never rots.

The notebook is executed with nbclient in a Jupyter kernel started from this interpreter (a
kernel spec written for the test: a `python3` spec elsewhere on the machine could name another
Python). Its `parameters` cell is followed by an injected cell with tiny settings, as papermill
does; the test then checks what a user would look at: the stage lines, the pictures shown
inline, eval.json, and samples drawn from the exported generator.
"""

import json
import os
import sys

import pytest

from tests import helpers

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

NOTEBOOK = os.path.join(helpers.ROOT, "experiments", "colab_tpu.ipynb")


def _tiny_parameters(workdir):
  """A few dozen steps of a 2 x 32 MLP: the cells run, not the method (that is measured in
  experiments/results/toy2d.md)."""
  return f"""
import sys
KERNEL_PYTHON = sys.executable
INSTALL = "auto"
ACCELERATOR = "cpu"
CONFIG = "configs/toy2d_fgm.py:quick"
WORKDIR = {str(workdir)!r}
TEACHER_STEPS = 60
FGM_STEPS = 20
EVAL_SAMPLES = 500
OVERRIDES = {{"batch_size": 64, "teacher.batch_size": 64, "teacher.model.hidden": 32,
             "teacher.model.depth": 2, "teacher.optim.warmup_steps": 5,
             "teacher.log.every": 20, "log.every": 10}}
GENERATOR_SAMPLES = 500
print("kernel python:", KERNEL_PYTHON)
"""


def _with_parameters(nb, source):
  """The notebook with ``source`` injected after its cell tagged 'parameters'."""
  index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  cell = nbformat.v4.new_code_cell(source)
  cell.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(index + 1, cell)
  return nb


def _kernel_manager(folder):
  """A KernelManager whose only kernel spec runs this interpreter."""
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import KernelManager
  spec_dir = os.path.join(folder, "kernels", "fgm-test")
  os.makedirs(spec_dir)
  with open(os.path.join(spec_dir, "kernel.json"), "w") as f:
    json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
               "display_name": "fgm_jax test", "language": "python"}, f)
  specs = KernelSpecManager(kernel_dirs=[os.path.join(folder, "kernels")],
                            ensure_native_kernel=False)
  return KernelManager(kernel_name="fgm-test", kernel_spec_manager=specs)


def _outputs(nb, marker):
  """The outputs of the code cell whose source contains ``marker``."""
  return next(c.outputs for c in nb.cells if c.cell_type == "code" and marker in c.source)


def _text(outputs):
  return "".join(o.get("text", "") for o in outputs if o.output_type == "stream")


def _has_image(outputs):
  return any("image/png" in o.get("data", {}) for o in outputs
             if o.output_type in ("display_data", "execute_result"))


def test_colab_notebook_runs_on_cpu(tmp_path):
  committed = nbformat.read(NOTEBOOK, as_version=4)
  # Committed without outputs: diffs stay readable and no stale result poses as a fresh one.
  assert all(not c.get("outputs") and c.get("execution_count") is None
             for c in committed.cells if c.cell_type == "code")
  workdir = tmp_path / "run"
  nb = _with_parameters(committed, _tiny_parameters(workdir))
  client = nbclient.NotebookClient(
      nb, km=_kernel_manager(str(tmp_path)), timeout=300,
      resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
  client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error

  assert f"kernel python: {sys.executable}" in _text(_outputs(nb, "KERNEL_PYTHON ="))
  install = _text(_outputs(nb, "def find_clone"))
  assert f"already installed from {helpers.ROOT}" in install  # found the clone, installed nothing
  assert "CPU device(s)" in _text(_outputs(nb, "devices = jax.devices()"))

  run = _text(_outputs(nb, "fgm_main.run(config, WORKDIR)"))
  for stage in ("[1/4] teacher", "[2/4] fgm", "[3/4] evaluate", "[4/4] report"):
    assert stage in run
  assert "steps/s" in run and "ETA" in run  # the training loops' progress lines
  assert "CheckpointManager" not in run  # orbax's INFO chatter is filtered out
  assert _has_image(_outputs(nb, "display(Image(filename=picture))"))

  evaluation = json.loads((workdir / "eval.json").read_text())
  assert evaluation["fgm_step"] == 20
  assert set(evaluation["metrics"]) >= {"fgm_1step", "teacher_euler_4step", "real_data"}
  assert _has_markdown(_outputs(nb, 'evaluation.get("metrics"'), "| fgm_1step |")

  sampled = _outputs(nb, "fgm_jax.load_generator(generator_dir)")
  assert "500 samples of shape (2,)" in _text(sampled)
  assert _has_image(sampled)
  assert (workdir / "fgm" / "generator" / "generator.safetensors").is_file()


def _has_markdown(outputs, text):
  return any(text in o.get("data", {}).get("text/markdown", "") for o in outputs
             if o.output_type in ("display_data", "execute_result"))
