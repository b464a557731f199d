"""The package's modules import each other without circles (docs/architecture.md's layering).

Edges come from every `import` / `from ... import` statement in the source, function-level ones
included (a lazy import that closes a circle is still a circle, only hidden until run time).
`from pkg import name` is an edge to the module pkg.name when that file exists, else to pkg.
"""
import ast
import pathlib

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent.parent / "detailflow_jax"


def module_files(package_dir, package_name):
  """{dotted module name: path} of every .py file under package_dir (packages by __init__)."""
  modules = {}
  for path in sorted(package_dir.rglob("*.py")):
    parts = path.relative_to(package_dir).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    modules[".".join((package_name,) + parts)] = path
  return modules


def _imported_modules(node, module, is_package, modules):
  """Package modules one import statement names."""
  if isinstance(node, ast.Import):
    return [alias.name for alias in node.names]
  if node.level:  # relative: resolve against the importing module's package
    base = module.split(".")
    base = base[:len(base) - node.level + (1 if is_package else 0)]
    source = ".".join(base + ([node.module] if node.module else []))
  else:
    source = node.module
  found = []
  for alias in node.names:
    candidate = f"{source}.{alias.name}"
    found.append(candidate if candidate in modules else source)
  return found


def import_graph(package_dir, package_name):
  """{module: set of package modules it imports}, read with ast (nothing is executed)."""
  modules = module_files(package_dir, package_name)
  graph = {}
  for module, path in modules.items():
    tree = ast.parse(path.read_text(), filename=str(path))
    targets = set()
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        for name in _imported_modules(node, module, path.name == "__init__.py", modules):
          while name and name not in modules and name.startswith(package_name + "."):
            name = name.rpartition(".")[0]  # `import pkg.mod.attr` style: the longest module
          if name in modules and name != module:
            targets.add(name)
    graph[module] = targets
  return graph


def find_cycles(graph):
  """One cycle [a, b, ..., a] per strongly connected component of more than one module."""
  index, low, on_stack, stack, components = {}, {}, set(), [], []

  def connect(v):  # Tarjan's algorithm
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        connect(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = set()
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.add(w)
        if w == v:
          break
      if len(component) > 1:
        components.append(component)

  for v in sorted(graph):
    if v not in index:
      connect(v)
  return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph, component):
  """A shortest path from the component's first module back to itself (breadth first)."""
  start = min(component)
  parents = {start: None}
  queue = [start]
  while queue:
    v = queue.pop(0)
    for w in sorted(graph[v] & component):
      if w == start:
        path = [v]
        while parents[path[-1]] is not None:
          path.append(parents[path[-1]])
        return path[::-1] + [start]
      if w not in parents:
        parents[w] = v
        queue.append(w)
  raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def test_package_has_no_import_cycles():
  graph = import_graph(PACKAGE_DIR, "detailflow_jax")
  assert len(graph) > 50 and "detailflow_jax.eval.inception" in graph  # the walk saw the tree
  assert "detailflow_jax.eval.inception" in graph["detailflow_jax.eval.inception_weights"]
  cycles = find_cycles(graph)
  assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_cycles_are_found_and_named(tmp_path):
  pkg = tmp_path / "pkg"
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "sub" / "__init__.py").write_text("from . import b\n")
  (pkg / "a.py").write_text("from pkg.sub import b\nimport os\n")
  (pkg / "sub" / "b.py").write_text("def f():\n  from .. import c\n")  # function-level import
  (pkg / "c.py").write_text("import pkg.a\n")
  (pkg / "d.py").write_text("from pkg import a, c\n")  # imports into the cycle, not part of it
  graph = import_graph(pkg, "pkg")
  assert graph["pkg.sub.b"] == {"pkg.c"}
  assert graph["pkg.d"] == {"pkg.a", "pkg.c"}
  assert find_cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]
  (pkg / "c.py").write_text("import os\n")
  assert find_cycles(import_graph(pkg, "pkg")) == []
