"""docs/architecture.md matches the package: every module path it names exists, and every module
of the package is named in it (a new module gets its line in the doc)."""
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = REPO / "detailflow_jax"
DOC = REPO / "docs" / "architecture.md"
# A path ending in .py; package-relative unless it starts with a top-level folder of the repo.
_PY_PATH = re.compile(r"(?<![\w/.<>*-])((?:[A-Za-z_]\w*/)*[A-Za-z_]\w*\.py)\b")
_REPO_FOLDERS = ("detailflow_jax/", "tests/", "configs/", "benchmarks/", "launch/")


def named_paths(text):
  """Repo-relative paths of the .py files the text names."""
  paths = set()
  for name in _PY_PATH.findall(text):
    paths.add(name if name.startswith(_REPO_FOLDERS) else f"detailflow_jax/{name}")
  return paths


def package_modules():
  """Repo-relative paths of the package's modules (package __init__ files excepted)."""
  return {str(path.relative_to(REPO)) for path in PACKAGE.rglob("*.py")
          if path.name != "__init__.py"}


def test_named_paths_exist():
  missing = sorted(p for p in named_paths(DOC.read_text()) if not (REPO / p).is_file())
  assert not missing, f"docs/architecture.md names files that do not exist: {missing}"


def test_every_module_is_named():
  unnamed = sorted(package_modules() - named_paths(DOC.read_text()))
  assert not unnamed, f"modules not named in docs/architecture.md (add a line): {unnamed}"


def test_path_reading():
  text = "`data/codes.py`, detailflow_jax/main.py, tests/test_x.py, configs/<name>.py, a.py"
  assert named_paths(text) == {"detailflow_jax/data/codes.py", "detailflow_jax/main.py",
                               "tests/test_x.py", "detailflow_jax/a.py"}
