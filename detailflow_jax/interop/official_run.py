"""The official DetailFlow run layout, read and written without the official code.

An official training run (and each released model) is a folder:
  RUN/config.json              the model's ModelArgs fields; the official loaders pass them to
                               the model constructor as keyword arguments, so nothing else may
                               be in it
  RUN/config.yaml              the training arguments; the loaders read the model family
                               (`vq_model` / `gpt_model`) and the R(n) schedule fields from it
  RUN/checkpoints/<step>.pt    torch.save({"model": state_dict, "ema": state_dict, ...})
We also read and write `RUN/checkpoints/<step>.safetensors` (the "model" state dict) and
`<step>.<entry>.safetensors` for the other entries, which needs no torch.

Entries besides "model" / "ema": the tokenizer's alignment MLP (`global_token_proj.*`) is kept
in "global_token_proj" / "global_token_proj_ema", outside the model state dict, because the
official model only has that MLP when it also holds the frozen SigLIP2 feature model (which
our checkpoints do not carry), and the official loaders load the model dict strictly.
"""
import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import re
import tempfile
from typing import Dict, Optional

import numpy as np
import yaml

from detailflow_jax.interop import official_config

CONFIG_JSON = "config.json"
CONFIG_YAML = "config.yaml"
CHECKPOINTS = "checkpoints"
MODEL, EMA = "model", "ema"
ALIGN, ALIGN_EMA = "global_token_proj", "global_token_proj_ema"
ENTRIES = (MODEL, EMA, ALIGN, ALIGN_EMA)


@dataclasses.dataclass
class OfficialRun:
  """One checkpoint of an official run. kind: "tokenizer" or "gpt"; model_args: config.json;
  train_args: config.yaml; state_dicts: entry ("model", "ema", ...) -> official tensor name ->
  numpy array in the PyTorch layout."""
  kind: str
  model_args: dict
  train_args: dict
  state_dicts: Dict[str, Dict[str, np.ndarray]]
  step: int


# ----------------------------------------------------------------------------- files

def _write_atomically(path, write):
  """write(tmp_path) then rename: a reader never sees a half-written file."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  os.close(fd)
  try:
    write(tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("reading or writing .pt checkpoints needs PyTorch: pip install -e .[torch] "
                      "(or use --format safetensors, which does not)") from e
  return torch


def _to_numpy(tensor):
  torch = _import_torch()
  tensor = tensor.detach().cpu()
  if tensor.is_floating_point() and tensor.dtype != torch.float32:
    tensor = tensor.float()   # bf16 / fp16 checkpoints: numpy has no bfloat16
  return tensor.numpy()


def save_pt(path, entries):
  """torch.save({entry: {name: tensor}}) of numpy state dicts."""
  torch = _import_torch()
  checkpoint = {name: {k: torch.from_numpy(np.array(v, copy=True)) for k, v in sd.items()}
                for name, sd in entries.items()}
  _write_atomically(path, lambda tmp: torch.save(checkpoint, tmp))


def load_pt(path, trust_pickle=False):
  """A .pt checkpoint as {entry: {name: numpy}} (tensor dicts only; other entries dropped).

  Loads with torch's weights-only unpickler (argparse.Namespace allowed: official training
  checkpoints store their args); trust_pickle=True allows arbitrary pickled objects."""
  torch = _import_torch()
  try:
    if trust_pickle:
      checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    else:
      # safe_globals exists from torch 2.5; before, a checkpoint with args needs --trust-pickle.
      allow = getattr(torch.serialization, "safe_globals", None)
      with allow([argparse.Namespace]) if allow else contextlib.nullcontext():
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
  except FileNotFoundError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    hint = ("" if trust_pickle else " If it holds other pickled objects and you trust its "
            "source, retry with --trust-pickle.")
    raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): "
                     f"{type(e).__name__}: {str(e)[:300]}.{hint}") from e
  if not isinstance(checkpoint, dict):
    raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
  if checkpoint and all(torch.is_tensor(v) for v in checkpoint.values()):
    checkpoint = {MODEL: checkpoint}        # a bare state dict (e.g. saved from FSDP)
  elif MODEL not in checkpoint:
    for alias in ("module", "state_dict"):   # DeepSpeed / Lightning style
      if isinstance(checkpoint.get(alias), dict):
        checkpoint[MODEL] = checkpoint.pop(alias)
  out = {}
  for name in ENTRIES:
    sd = checkpoint.get(name)
    if isinstance(sd, dict):
      out[name] = {k: _to_numpy(v) for k, v in sd.items() if torch.is_tensor(v)}
  if MODEL not in out and EMA not in out:
    raise ValueError(f"{path} has no 'model' or 'ema' state dict (top-level keys: "
                     f"{sorted(map(str, checkpoint))})")
  return out


def safetensors_path(directory, step, entry):
  suffix = "" if entry == MODEL else f".{entry}"
  return pathlib.Path(directory) / f"{step:07d}{suffix}.safetensors"


def save_safetensors(directory, step, entries):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  paths = []
  for name, sd in entries.items():
    path = safetensors_path(directory, step, name)
    arrays = {k: np.ascontiguousarray(v) for k, v in sd.items()}
    _write_atomically(path, lambda tmp, a=arrays: save_file(a, tmp, metadata={"format": "pt"}))
    paths.append(path)
  return paths


def load_safetensors(path):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    return load_file(str(path))
  except FileNotFoundError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): "
                     f"{type(e).__name__}: {str(e)[:300]}") from e


_PT_NAME = re.compile(r"^(\d+)\.(pt|pth)$")
_SAFETENSORS_NAME = re.compile(r"^(\d+)(?:\.([A-Za-z_]+))?\.safetensors$")


def list_checkpoints(directory):
  """{step: {"pt": path} and/or {"safetensors": {entry: path}}} of RUN/checkpoints."""
  found = {}
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    return found
  for path in directory.iterdir():
    if m := _PT_NAME.match(path.name):
      found.setdefault(int(m.group(1)), {})["pt"] = path
    elif (m := _SAFETENSORS_NAME.match(path.name)) and (m.group(2) or MODEL) in ENTRIES:
      files = found.setdefault(int(m.group(1)), {}).setdefault("safetensors", {})
      files[m.group(2) or MODEL] = path
  return found


def write_run(out_dir, run: OfficialRun, fmt="pt"):
  """Writes config.json, config.yaml and the checkpoint of `run`; returns the checkpoint path."""
  if fmt not in ("pt", "safetensors"):
    raise ValueError(f"format={fmt!r}; valid: 'pt', 'safetensors'")
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  text = json.dumps(official_config.plain(run.model_args), indent=2) + "\n"
  _write_atomically(out_dir / CONFIG_JSON, lambda tmp: pathlib.Path(tmp).write_text(text))
  yaml_text = yaml.safe_dump(official_config.plain(run.train_args), sort_keys=False)
  _write_atomically(out_dir / CONFIG_YAML, lambda tmp: pathlib.Path(tmp).write_text(yaml_text))
  directory = out_dir / CHECKPOINTS
  if fmt == "pt":
    path = directory / f"{run.step:07d}.pt"
    save_pt(path, run.state_dicts)
    return path
  return save_safetensors(directory, run.step, run.state_dicts)[0]


def _read_configs(run_dir):
  json_path, yaml_path = run_dir / CONFIG_JSON, run_dir / CONFIG_YAML
  if not json_path.is_file():
    raise ValueError(f"{json_path} not found: an official run holds its model arguments there "
                     "(next to checkpoints/)")
  try:
    model_args = json.loads(json_path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{json_path} is not valid JSON: {e}") from e
  train_args = {}
  if yaml_path.is_file():
    try:
      train_args = yaml.safe_load(yaml_path.read_text()) or {}
    except yaml.YAMLError as e:
      raise ValueError(f"{yaml_path} is not valid YAML: {e}") from e
  return model_args, train_args


def read_run(path, step: Optional[int] = None, trust_pickle=False) -> OfficialRun:
  """Reads an official run: `path` is the run folder (with config.json, config.yaml and
  checkpoints/) or one checkpoint file in it. Default step: the latest checkpoint."""
  path = pathlib.Path(path)
  if path.is_file():
    run_dir = path.parent.parent if path.parent.name == CHECKPOINTS else path.parent
    m = _PT_NAME.match(path.name) or _SAFETENSORS_NAME.match(path.name)
    file_step = int(m.group(1)) if m else 0
    if path.suffix == ".safetensors":
      files = list_checkpoints(path.parent).get(file_step, {}).get("safetensors", {MODEL: path})
      chosen = (file_step, {"safetensors": files})
    else:
      chosen = (file_step, {"pt": path})
  elif path.is_dir():
    run_dir = path
    available = list_checkpoints(run_dir / CHECKPOINTS)
    if not available:
      raise ValueError(
          f"no checkpoint (<step>.pt or <step>.safetensors) in {run_dir / CHECKPOINTS}")
    if step is None:
      step = max(available)
    if int(step) not in available:
      raise ValueError(f"step={step} has no checkpoint in {run_dir / CHECKPOINTS}; available "
                       f"steps: {sorted(available)}")
    chosen = (int(step), available[int(step)])
  else:
    raise ValueError(f"{path} does not exist")
  model_args, train_args = _read_configs(run_dir)
  file_step, files = chosen
  if "safetensors" in files:   # preferred: needs no torch, holds no pickled code
    state_dicts = {name: load_safetensors(p) for name, p in files["safetensors"].items()}
  else:
    state_dicts = load_pt(files["pt"], trust_pickle=trust_pickle)
  kind = official_config.run_kind(model_args, train_args)
  return OfficialRun(kind, model_args, train_args, state_dicts, file_step)
