"""Loading trained models from a workdir: WORKDIR/config.json + WORKDIR/checkpoints/<step>/state.

A training job writes its whole config as WORKDIR/config.json (`save_workdir_config`) and orbax
checkpoints of its train state. The state item is a pytree whose `params` / `ema_params` hold
the model weights: {"tokenizer": ...} for a tokenizer run, the GPT params themselves for an AR
run. Only that subtree is read (orbax partial restore), never the optimizer state, so loading a
model costs its own size.
"""
import dataclasses
import json
import os
import pathlib
import tempfile
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
STATE_ITEM = "state"


def _umask():
  mask = os.umask(0)
  os.umask(mask)
  return mask


def replace_atomically(path, write):
  """Calls write(binary file) on a temporary file beside `path`, then renames it to `path`, so
  readers never see a half-written file (a crash leaves the old file or none)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text_atomically(path, text):
  """Writes `text` to `path` through a temporary file and a rename."""
  replace_atomically(path, lambda f: f.write(text.encode()))


def save_workdir_config(config, workdir):
  """Writes the job's config as WORKDIR/config.json (process 0 only; others return at once).

  Later jobs (code extraction, evaluation, conversion) read the model settings from it.
  Returns the path written, or None on other processes.
  """
  if jax.process_index() != 0:
    return None
  path = pathlib.Path(workdir) / CONFIG_FILE
  write_text_atomically(path, config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
  return path


def load_workdir_config(workdir):
  """The ConfigDict saved in WORKDIR/config.json (ValueError naming the file when absent)."""
  path = pathlib.Path(workdir) / CONFIG_FILE
  if not path.is_file():
    raise ValueError(
        f"{path} not found: {workdir} is not a workdir written by a training job of this "
        "package (training jobs save their config there; an official PyTorch run must be "
        "imported first with `python -m detailflow_jax.convert from-torch`)")
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except json.JSONDecodeError as error:
    raise ValueError(f"{path} is not valid JSON: {error}") from error


def checkpoint_steps(workdir):
  """Steps with a checkpoint in WORKDIR/checkpoints, ascending."""
  directory = pathlib.Path(workdir) / CHECKPOINTS_DIR
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit() and (p / STATE_ITEM).is_dir())


def resolve_step(workdir, step=None):
  """`step` if it has a checkpoint, else the latest one; ValueError when there is none."""
  steps = checkpoint_steps(workdir)
  if not steps:
    raise ValueError(f"no checkpoint under {pathlib.Path(workdir) / CHECKPOINTS_DIR}; "
                     "train the model first (or point at the right workdir)")
  if step is None:
    return steps[-1]
  if int(step) not in steps:
    raise ValueError(f"step={step} has no checkpoint in {workdir}; available steps: {steps}")
  return int(step)


def _state_dir(workdir, step):
  return pathlib.Path(workdir).absolute() / CHECKPOINTS_DIR / str(step) / STATE_ITEM


def state_metadata(workdir, step):
  """The saved state's tree of metadata (shape, dtype per leaf) without reading arrays."""
  metadata = ocp.PyTreeCheckpointHandler().metadata(_state_dir(workdir, step))
  return metadata.tree if hasattr(metadata, "tree") else metadata


def _subtree(tree, path, workdir):
  for key in path:
    if not isinstance(tree, dict) or key not in tree:
      where = "/".join(path)
      raise ValueError(f"the checkpoint in {workdir} has no '{where}' in its state "
                       f"(found keys {sorted(tree) if isinstance(tree, dict) else type(tree)})")
    tree = tree[key]
  return tree


def restore_state_subtree(workdir, path: Sequence[str], step=None):
  """The subtree state[path[0]][path[1]]... of a checkpoint, as numpy arrays.

  Nothing else is read from disk (orbax partial restore). Returns (subtree, step).
  """
  step = resolve_step(workdir, step)
  metadata = _subtree(state_metadata(workdir, step), tuple(path), workdir)
  template = jax.tree_util.tree_map(lambda m: np.zeros(m.shape, m.dtype), metadata)
  nested = template
  for key in reversed(tuple(path)):
    nested = {key: nested}
  restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), nested)
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    restored = checkpointer.restore(
        _state_dir(workdir, step),
        args=ocp.args.PyTreeRestore(item=nested, restore_args=restore_args, partial_restore=True))
  finally:
    checkpointer.close()
  return _subtree(restored, tuple(path), workdir), step


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """Weights read from a workdir. config: the model section (tokenizer ConfigDict or GPTConfig);
  params: numpy pytree (the inner tree, no {'params': ...} wrapper); step: checkpoint step."""
  config: Any
  params: Any
  step: int
  workdir: str
  use_ema: bool


def _params_path(workdir, step, use_ema, inner):
  outer = "ema_params" if use_ema else "params"
  path = (outer,) + inner
  if use_ema:
    subtree = _subtree(state_metadata(workdir, step), ("ema_params",), workdir)
    if not subtree:
      raise ValueError(f"use_ema=True but the checkpoint of step {step} in {workdir} has no "
                       "EMA weights (that run trained with train.ema_decay=0); use the raw "
                       "params (use_ema=False)")
  return path


def load_tokenizer(workdir, *, use_ema=False, step: Optional[int] = None):
  """The tokenizer config (`tokenizer` section of WORKDIR/config.json) and params of a
  tokenizer workdir, from the latest checkpoint unless `step` is given."""
  config = load_workdir_config(workdir)
  if "tokenizer" not in config:
    raise ValueError(f"{workdir}/{CONFIG_FILE} has no `tokenizer` section (job="
                     f"{config.get('job')!r}); pass the workdir of a tokenizer run")
  step = resolve_step(workdir, step)
  params, step = restore_state_subtree(
      workdir, _params_path(workdir, step, use_ema, ("tokenizer",)), step)
  return LoadedModel(config.tokenizer, params, step, str(workdir), use_ema)


def load_gpt(workdir, *, use_ema=False, step: Optional[int] = None):
  """The GPTConfig (`gpt` section of WORKDIR/config.json) and params of an AR workdir."""
  from detailflow_jax.models import gpt  # pylint: disable=g-import-not-at-top
  config = load_workdir_config(workdir)
  if "gpt" not in config:
    raise ValueError(f"{workdir}/{CONFIG_FILE} has no `gpt` section (job="
                     f"{config.get('job')!r}); pass the workdir of an AR (train_ar) run")
  step = resolve_step(workdir, step)
  params, step = restore_state_subtree(workdir, _params_path(workdir, step, use_ema, ()), step)
  return LoadedModel(gpt.GPTConfig.from_dict(config.gpt), params, step, str(workdir), use_ema)
