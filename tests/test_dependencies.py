"""setup.py declares exactly the third-party modules the package imports, and constraints.txt
(the tested set that launch/setup.sh installs) satisfies every declared requirement.

Imports are read with `ast` from detailflow_jax/**/*.py. An import inside `try: ... except
ImportError` is optional: its distribution may be declared in an extra instead of
install_requires (torch, for official .pt checkpoints). The `test` extra holds tools (pytest and
its plugins), which the package does not import.
"""
import ast
import importlib.metadata
import pathlib
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "detailflow_jax"
TOOL_EXTRAS = ("test",)
IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError"}


def _catches_import_error(handler):
  names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
  return any(isinstance(n, ast.Name) and n.id in IMPORT_ERRORS for n in names)


def _imported_names(node):
  if isinstance(node, ast.Import):
    return [alias.name.split(".")[0] for alias in node.names]
  if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
    return [node.module.split(".")[0]]
  return []


def imports_of(source):
  """{top-level module: optional?} of one file; optional means every import of it is guarded."""
  found = {}

  def visit(node, guarded):
    for name in _imported_names(node):
      found[name] = found.get(name, True) and guarded
    if isinstance(node, ast.Try):
      inner = guarded or any(_catches_import_error(h) for h in node.handlers)
      for child in node.body:
        visit(child, inner)
      for child in node.handlers + node.orelse + node.finalbody:
        visit(child, guarded)
      return
    for child in ast.iter_child_nodes(node):
      visit(child, guarded)

  visit(ast.parse(source), False)
  return found


def third_party_imports():
  """{top-level module: (optional?, [files])} over the package, without stdlib and itself."""
  result = {}
  for path in sorted((REPO / PACKAGE).rglob("*.py")):
    for name, optional in imports_of(path.read_text()).items():
      if name in sys.stdlib_module_names or name == PACKAGE:
        continue
      was_optional, files = result.get(name, (True, []))
      result[name] = (was_optional and optional, files + [str(path.relative_to(REPO))])
  return result


def distributions_of(module, mapping):
  """Distribution names (canonical) that provide `module`; a module that is not installed
  (an optional one such as torch) is assumed to share its distribution's name."""
  return {canonicalize_name(d) for d in mapping.get(module, [module])}


def setup_keywords():
  """The keywords of setup.py's setup(...) call, read without running it; a keyword given as a
  name is looked up among the module's top-level assignments."""
  tree = ast.parse((REPO / "setup.py").read_text())
  assigned = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign)
              for t in node.targets if isinstance(t, ast.Name)}
  call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
              and getattr(n.func, "id", None) == "setup")
  keywords = {}
  for keyword in call.keywords:
    value = keyword.value
    if isinstance(value, ast.Name):
      value = assigned[value.id]
    try:
      keywords[keyword.arg] = ast.literal_eval(value)
    except ValueError:
      pass  # e.g. packages=find_packages(...)
  return keywords


def requirements(specs):
  return {canonicalize_name(r.name): r for r in map(Requirement, specs)}


def test_declared_and_imported_third_party_modules_are_the_same_set():
  keywords = setup_keywords()
  runtime = requirements(keywords["install_requires"])
  extras = {name: requirements(specs) for name, specs in keywords["extras_require"].items()}
  optional_ok = set(runtime).union(*(set(v) for k, v in extras.items() if k not in TOOL_EXTRAS))
  mapping = importlib.metadata.packages_distributions()

  missing, used = [], set()
  for module, (optional, files) in sorted(third_party_imports().items()):
    dists = distributions_of(module, mapping)
    used |= dists
    allowed = optional_ok if optional else set(runtime)
    if not dists & allowed:
      where = "an extra or install_requires" if optional else "install_requires"
      missing.append(f"{module} (distribution {' or '.join(sorted(dists))}; imported by "
                     f"{', '.join(files[:3])}) is not in {where}")
  declared = set(runtime).union(*(set(v) for k, v in extras.items() if k not in TOOL_EXTRAS))
  unused = sorted(declared - used)
  message = []
  if missing:
    message.append("imported but not declared in setup.py:\n  " + "\n  ".join(missing))
  if unused:
    message.append("declared in setup.py but never imported by detailflow_jax/: "
                   + ", ".join(unused))
  assert not message, "\n".join(message)


def test_optional_imports_are_seen_as_optional():
  source = ("import numpy\n"
            "def f():\n"
            "  try:\n"
            "    import torch.nn\n"
            "  except (ImportError, OSError):\n"
            "    import yaml\n")
  assert imports_of(source) == {"numpy": False, "torch": True, "yaml": False}


def test_constraints_pin_every_declared_requirement_within_its_range():
  pins = {}
  for line in (REPO / "constraints.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if line:
      name, _, version = line.partition("==")
      assert version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
      pins[canonicalize_name(name)] = Version(version)
  keywords = setup_keywords()
  declared = dict(requirements(keywords["install_requires"]),
                  **requirements(keywords["extras_require"]["test"]))
  unpinned = sorted(set(declared) - set(pins))
  outside = sorted(f"{name}=={pins[name]} (setup.py: {declared[name]})"
                   for name in set(declared) & set(pins)
                   if not declared[name].specifier.contains(pins[name], prereleases=True))
  assert not unpinned, f"not pinned in constraints.txt: {', '.join(unpinned)}"
  assert not outside, f"constraints.txt pins outside setup.py's ranges: {', '.join(outside)}"
  assert canonicalize_name(PACKAGE) not in pins, "constraints.txt must not pin the project"
