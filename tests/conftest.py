"""Shared test fixtures. Official parity outputs are read from DETAILFLOW_PARITY_DIR."""
import json
import os
import pathlib

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def parity_root():
  return pathlib.Path(os.environ.get("DETAILFLOW_PARITY_DIR", REPO_ROOT.parent / "shared" / "parity"))


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


@pytest.fixture(scope="session", params=["gpt_a", "gpt_b"])
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
