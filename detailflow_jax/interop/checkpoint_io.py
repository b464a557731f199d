"""Model weights in and out of our workdirs (WORKDIR/config.json + orbax checkpoints).

Reading takes only the `params` and `ema_params` subtrees of a checkpoint's state (orbax
partial restore into numpy), so the optimizer state of a large model is never loaded.

Writing an imported model gives a workdir that every inference job reads like a trained one:
WORKDIR/config.json (the training config with the imported model section) and
WORKDIR/checkpoints/<step>/{state, data} with state = {step, params, ema_params}. It holds no
optimizer state, so training does not resume from it.
"""
import dataclasses
import pathlib
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from detailflow_jax import workdir_io
from detailflow_jax.train import checkpoints

TOKENIZER, GPT = "tokenizer", "gpt"
# The job names of the training configs, which say what a workdir holds.
_JOB_KINDS = {"train_tokenizer": TOKENIZER, "train_ar": GPT}


@dataclasses.dataclass
class WorkdirWeights:
  """Weights of one checkpoint of a workdir.

  kind: "tokenizer" or "gpt". config: the whole training ConfigDict of WORKDIR/config.json.
  params: a tokenizer's {"tokenizer": ..., "align_mlp": ... (when trained with alignment)} or
  the GPT param tree; numpy leaves. ema_params: the same structure, or {} without EMA.
  """
  kind: str
  config: Any
  params: dict
  ema_params: dict
  step: int


def workdir_kind(config):
  """"tokenizer" or "gpt" for a workdir's training config."""
  job = config.get("job")
  if job in _JOB_KINDS:
    return _JOB_KINDS[job]
  if "tokenizer" in config and "gpt" not in config:
    return TOKENIZER
  if "gpt" in config and "tokenizer" not in config:
    return GPT
  raise ValueError(f"config.json of job={job!r} holds neither a tokenizer run (job="
                   "train_tokenizer) nor an AR run (job=train_ar)")


def _is_empty(tree):
  return isinstance(tree, dict) and not tree


def read_workdir(workdir, step: Optional[int] = None) -> WorkdirWeights:
  """The params and EMA params of a workdir's checkpoint (latest unless `step`)."""
  config = workdir_io.load_workdir_config(workdir)
  kind = workdir_kind(config)
  step = workdir_io.resolve_step(workdir, step)
  metadata = workdir_io.state_metadata(workdir, step)
  if not isinstance(metadata, dict) or "params" not in metadata:
    raise ValueError(f"the state of step {step} in {workdir} has no 'params' "
                     f"(found {sorted(metadata) if isinstance(metadata, dict) else metadata})")
  params, _ = workdir_io.restore_state_subtree(workdir, ("params",), step)
  ema = {}
  if not _is_empty(metadata.get("ema_params", {})):
    ema, _ = workdir_io.restore_state_subtree(workdir, ("ema_params",), step)
  if kind == TOKENIZER and "tokenizer" not in params:
    raise ValueError(f"the tokenizer checkpoint of step {step} in {workdir} has no "
                     f"params/tokenizer (found {sorted(params)})")
  return WorkdirWeights(kind, config, params, ema, step)


def _as_numpy(tree):
  return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)


def write_workdir(workdir, config, params, ema_params, step) -> pathlib.Path:
  """Writes config.json and an orbax checkpoint {step, params, ema_params} at `step`.

  Refuses a workdir that already has checkpoints: an import never mixes with another run."""
  existing = workdir_io.checkpoint_steps(workdir)
  if existing:
    raise ValueError(f"{workdir} already holds checkpoints {existing}; import into an empty "
                     "--workdir")
  if not isinstance(config, ml_collections.ConfigDict):
    config = ml_collections.ConfigDict(config)
  workdir_io.save_workdir_config(config, workdir)
  state = {"step": np.asarray(step, np.int32), "params": _as_numpy(params),
           "ema_params": _as_numpy(ema_params) if ema_params else {}}
  checkpointer = checkpoints.Checkpointer(workdir, keep=1)
  try:
    checkpointer.save(int(step), state, {"imported": True})
  finally:
    checkpointer.close()
  return pathlib.Path(workdir) / workdir_io.CHECKPOINTS_DIR / str(int(step))
