"""Shared test fixtures. Official parity outputs are read from DETAILFLOW_PARITY_DIR."""
import json
import os
import pathlib

import fake_fashion_mnist
import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fake_fmnist_dir(tmp_path_factory):
  """A Fashion-MNIST folder of random images (tests/fake_fashion_mnist.py), 64 train, 16 test:
  enough for the smoke configs' batches; training runs read it instead of the system package."""
  directory = tmp_path_factory.mktemp("fmnist")
  fake_fashion_mnist.write_fake_fashion_mnist(directory, num_train=64, num_test=16)
  return directory


def parity_root():
  return pathlib.Path(os.environ.get("DETAILFLOW_PARITY_DIR", REPO_ROOT.parent / "shared" / "parity"))


# Parity tests take every shape, size, case and key from the fixture set itself, so an official
# set of other shapes passes unchanged. The helpers below read it at collection time (for
# parametrize); when the set is absent they give one placeholder that the fixtures then skip.
ABSENT = "absent"


def parity_json(relative):
  """A JSON file of the fixture set (relative to its root), or None when it is not there."""
  path = parity_root() / relative
  return json.loads(path.read_text()) if path.is_file() else None


def parity_params(relative, select):
  """parametrize values select(json) of a fixture JSON file, or [ABSENT] when it is absent."""
  data = parity_json(relative)
  return [ABSENT] if data is None else list(select(data))


def parity_folders(prefix):
  """The fixture folders named prefix* that hold a config.json (e.g. every GPT case)."""
  root = parity_root()
  names = sorted(p.name for p in root.glob(f"{prefix}*") if (p / "config.json").is_file()) \
      if root.is_dir() else []
  return names or [prefix]   # a missing folder: its fixture skips with the path


class ParityCase:
  """One folder of official outputs: config.json, io.npz, state_dict.npz."""

  def __init__(self, folder):
    self.folder = folder
    self.config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    self.io = dict(np.load(folder / "io.npz")) if (folder / "io.npz").exists() else {}
    sd = folder / "state_dict.npz"
    self.state_dict = dict(np.load(sd)) if sd.exists() else {}


def _parity_case(name):
  folder = parity_root() / name
  if not folder.is_dir():
    pytest.skip(f"official parity outputs not found at {folder} (set DETAILFLOW_PARITY_DIR)")
  return ParityCase(folder)


@pytest.fixture(scope="session")
def parity_tokenizer():
  return _parity_case("tokenizer")


@pytest.fixture(scope="session", params=parity_folders("gpt"))
def parity_gpt(request):
  return _parity_case(request.param)


@pytest.fixture(scope="session")
def parity_resolution():
  folder = parity_root() / "resolution"
  if not folder.is_dir():
    pytest.skip(f"official parity outputs not found at {folder} (set DETAILFLOW_PARITY_DIR)")
  return folder


def max_relative_error(actual, expected):
  """max |a - e| / max |e|: the figure the parity tests bound."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-12))


def parity_scale_name(scale):
  """1.5 -> '1p5', 2.0 -> '2': how a GPT fixture names its decodes (greedy_cfg1p5_tokens)."""
  return f"{scale:g}".replace(".", "p")
