"""fgm_jax's modules import each other in one direction: no cycles, and low floors stay low.

The graph is read from the source (``ast``), not by importing, so it sees every import
statement wherever it is: at module level, inside functions (a lazy import still ties the
two modules together in the design) and under ``if TYPE_CHECKING``. ``from fgm_jax.a import
b`` is an edge to ``fgm_jax.a.b`` when that is a module, else to ``fgm_jax.a``; relative
imports are resolved against the importing module's package.

What is counted: every edge between two modules of ``fgm_jax``, except the edges of a
package's ``__init__`` to its own submodules (a package exporting or registering its parts
is normal; an edge from a submodule up to its package ``__init__`` does count). Registry
entries ("module:factory" strings resolved by ``importlib``) are lookups by name, not
imports, and are not edges.
"""

import ast
import pathlib

import fgm_jax

PACKAGE = "fgm_jax"
ROOT = pathlib.Path(fgm_jax.__file__).parent


def module_files(root: pathlib.Path = ROOT) -> dict[str, pathlib.Path]:
  """Dotted module name -> source file, for every .py under the package."""
  out = {}
  for path in sorted(root.rglob("*.py")):
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts.pop()
    out[".".join(parts)] = path
  return out


def _is_package(name: str, files: dict) -> bool:
  return name in files and files[name].name == "__init__.py"


def _resolve_from(node: ast.ImportFrom, importer: str, files: dict) -> str:
  """The absolute module a ``from ... import`` statement names (before its imported names)."""
  if node.level == 0:
    return node.module or ""
  # Relative: level 1 is the importer's own package (itself when it is an __init__).
  base = importer.split(".")
  if not _is_package(importer, files):
    base = base[:-1]
  base = base[:len(base) - (node.level - 1)]
  return ".".join(base + ([node.module] if node.module else []))


def imports_of(importer: str, source: str, files: dict) -> set[str]:
  """The fgm_jax modules one module's source imports (any depth in the file)."""
  found = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = _resolve_from(node, importer, files)
      # `from pkg import sub` imports the submodule; `from mod import name` the module.
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
    else:
      continue
    for target in targets:
      # `import fgm_jax.a.b.c` where c is an attribute: keep the longest known module.
      while target and target not in files:
        target = target.rpartition(".")[0]
      if target.split(".")[0] == PACKAGE and target != importer:
        found.add(target)
  return found


def import_graph(files: dict | None = None) -> dict[str, set[str]]:
  """Module -> the fgm_jax modules it imports, without a package's edges to its own parts."""
  files = module_files() if files is None else files
  graph = {}
  for name, path in files.items():
    edges = imports_of(name, path.read_text(), files)
    if _is_package(name, files):
      edges = {e for e in edges if not e.startswith(name + ".")}
    graph[name] = edges
  return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
  """Tarjan's components with more than one module (each one is a cycle or several)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def cycle_through(graph: dict[str, set[str]], component: list[str]) -> list[str]:
  """One readable chain a -> b -> ... -> a inside a component (shortest back to its start)."""
  members, start = set(component), component[0]
  parents, frontier = {start: None}, [start]
  while frontier:
    nxt = []
    for v in frontier:
      for w in sorted(graph[v] & members):
        if w == start:
          chain = [v]
          while parents[chain[-1]] is not None:
            chain.append(parents[chain[-1]])
          return list(reversed(chain)) + [start]
        if w not in parents:
          parents[w] = v
          nxt.append(w)
    frontier = nxt
  raise AssertionError(f"no cycle through {start} in {component}")


def describe_cycles(graph: dict[str, set[str]]) -> list[str]:
  return [
      f"{' <-> '.join(c)}\n    e.g. {' -> '.join(cycle_through(graph, c))}"
      for c in strongly_connected(graph)
  ]


# Floors (DESIGN.md §3): each group of modules, and what it may not import. Pure math and
# models sit below everything that trains, evaluates or does I/O; the loop below evaluation
# (it takes its hooks as arguments); evaluation and export below the jobs that run them.
JOBS = ("fgm_jax.train_job", "fgm_jax.pipeline", "fgm_jax.main", "fgm_jax.aot")
FLOORS = {
    ("fgm_jax.flow", "fgm_jax.fgm", "fgm_jax.models", "fgm_jax.params_tree",
     "fgm_jax.registry", "fgm_jax.sharding"):
        ("fgm_jax.train", "fgm_jax.evaluation", "fgm_jax.sd3", "fgm_jax.export",
         "fgm_jax.checkpoint", "fgm_jax.convert", "fgm_jax.data", "fgm_jax.config_checks")
        + JOBS,
    ("fgm_jax.train",): ("fgm_jax.evaluation", "fgm_jax.sd3", "fgm_jax.export") + JOBS,
    ("fgm_jax.evaluation", "fgm_jax.export"): ("fgm_jax.convert", "fgm_jax.sd3") + JOBS,
}


def _under(name: str, prefixes) -> bool:
  return any(name == p or name.startswith(p + ".") for p in prefixes)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
  """'module -> import' for every import a floor forbids."""
  return sorted(f"{m} -> {t}" for floor, above in FLOORS.items() for m in graph
                if _under(m, floor) for t in graph[m] if _under(t, above))


def test_reader_sees_lazy_relative_and_submodule_imports(tmp_path):
  pkg = tmp_path / PACKAGE
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("from fgm_jax import sub\n")
  (pkg / "sub" / "__init__.py").write_text("from . import leaf\n")
  (pkg / "sub" / "leaf.py").write_text(
      "import os\n"
      "def f():\n"
      "  from fgm_jax import top  # lazy\n"
      "  from ..top import helper\n"
      "  import fgm_jax.sub.leaf\n")
  (pkg / "top.py").write_text("from fgm_jax.sub.leaf import f\nimport fgm_jax.sub\n")
  files = module_files(pkg)
  graph = import_graph(files)
  assert graph == {
      "fgm_jax": set(),  # the package's own parts are not counted
      "fgm_jax.sub": set(),
      "fgm_jax.sub.leaf": {"fgm_jax.top"},
      "fgm_jax.top": {"fgm_jax.sub.leaf", "fgm_jax.sub"},
  }
  assert describe_cycles(graph) == [
      "fgm_jax.sub.leaf <-> fgm_jax.top\n"
      "    e.g. fgm_jax.sub.leaf -> fgm_jax.top -> fgm_jax.sub.leaf"]


def test_no_import_cycles():
  graph = import_graph()
  assert len(graph) > 50  # the walk found the package
  cycles = describe_cycles(graph)
  assert not cycles, "import cycles in fgm_jax:\n  " + "\n  ".join(cycles)


def test_floors_import_nothing_above_them():
  upward = upward_imports(import_graph())
  assert not upward, "imports a floor forbids (DESIGN.md §3):\n  " + "\n  ".join(upward)
