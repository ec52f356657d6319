"""Defaults live in configs/ only: fgm_jax reads config fields, never ``.get(name, default)``.

Read from the source (``ast``). A ``.get(`` is on one of our config sections when its receiver
is an attribute chain through a section name (``config.eval.get``, ``teacher.data.get``), a
variable named like a section (``model.get``, ``data_config.get``), or ``config.get("eval")``
naming a section. ``.get`` on external dicts (config.json, checkpoint metadata, manifests,
state dicts) is fine and is not matched: those are bare names like ``config``/``config_json``/``meta``
with keys that are not our sections.
"""

import ast

from tests.unit.test_import_graph import module_files

SECTIONS = {"config", "model", "data", "eval", "fid", "sample", "fgm", "teacher", "optim",
            "online_optim", "log", "checkpoint", "mesh", "sd3", "aot", "export", "flow",
            "compilation_cache"}
# Bare variables that hold a section; a bare `config`/`teacher` is also a json dict elsewhere.
SECTION_VARIABLES = SECTIONS - {"config", "teacher", "export", "flow", "log"}


def _chain(node):
  """Names along an attribute chain, root first; None when it starts at a call or literal."""
  names = []
  while isinstance(node, ast.Attribute):
    names.append(node.attr)
    node = node.value
  if not isinstance(node, ast.Name):
    return None
  return [node.id] + names[::-1]


def _is_section(name: str) -> bool:
  return name in SECTIONS or name.endswith("_config")


def reads_a_default(call: ast.Call) -> bool:
  if not (isinstance(call.func, ast.Attribute) and call.func.attr == "get"):
    return False
  chain = _chain(call.func.value)
  if chain is None:
    return False
  if len(chain) > 1:
    return any(_is_section(n) for n in chain)
  name = chain[0]
  if name in SECTION_VARIABLES or name.endswith("_config"):
    return True
  key = call.args[0] if call.args else None
  return (name == "config" and isinstance(key, ast.Constant) and isinstance(key.value, str)
          and key.value in SECTIONS)


def config_gets(source: str):
  return [n.lineno for n in ast.walk(ast.parse(source))
          if isinstance(n, ast.Call) and reads_a_default(n)]


def test_the_matcher_tells_config_sections_from_external_dicts():
  found = config_gets("\n".join([
      'config.eval.get("fid")',                  # 1: a section's field
      'teacher.data.get("tfds_name")',           # 2
      'data_config.get("split", "train")',       # 3
      'model.get("dtype", "float32")',           # 4
      'config.get("eval", {})',                  # 5: a section of the run config
      'config.get("architectures")',             # config.json dicts, metadata, queues: fine
      'meta.get("format")',
      'paths.read_json(p).get("config", {})',
      'config_json.get("sample_size", 32)',
      'os.environ.get("HOME")',
  ]))
  assert found == [1, 2, 3, 4, 5]


def test_fgm_jax_reads_no_config_defaults():
  offenders = [f"{path}:{line}" for path in module_files().values()
               for line in config_gets(path.read_text())]
  assert not offenders, ("config defaults belong in configs/ (configs/common.py); read the "
                         f"field instead: {offenders}")
