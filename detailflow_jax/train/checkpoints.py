"""Orbax checkpoints of a train state plus every process's data iterator state.

Saves are asynchronous: `save` returns once the state is copied off the accelerators, and orbax
writes the files on a background thread while training goes on. A save first waits for the one
before it; `wait` and `close` wait for the one in flight (the training loop does so when it
returns: at the end, at SIGTERM, on an error). Orbax writes each step into a temporary folder and
renames it when every process has finished, so a crash or a kill during a write leaves the
previous step the latest one: `latest_step`, `restore` and every later stage (they list
WORKDIR/checkpoints/<digits>) see complete steps only.

Each process keeps its own data iterator state, in
`<step>/data_iterator/process_<i>-of-<n>.json` (grain's iterator checkpoint handler): the
processes read different rows, so one process's position does not stand for another's. Restoring
reads this process's file, so it needs the process count that saved it, except when every
process saved the same state (then the state does not depend on the process: the tokenizer
pipeline's global batch index, for one). Checkpoints written before this layout hold one JSON
state in `<step>/data`; they restore as before.
"""
import json
import pathlib
import re

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

STATE_ITEM = "state"
DATA_ITEM = "data_iterator"
LEGACY_DATA_ITEM = "data"   # one JSON state, written by process 0 (older checkpoints)
_PROCESS_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


class _SavedIteratorState:
  """What grain's checkpoint handler saves and restores in place of a live iterator.

  The state is taken when `Checkpointer.save` is called, before the loop draws the next batch,
  so it is the right one whichever thread writes it. Grain's handler stores get_state()'s bytes
  as this process's JSON file and gives them back to set_state()."""

  def __init__(self, state=None):
    self.state = state

  def get_state(self):
    return json.dumps(self.state, sort_keys=True).encode()

  def set_state(self, raw):
    self.state = json.loads(raw)

  def start_prefetch(self):  # grain's handler calls it after set_state; nothing to prefetch
    pass


class Checkpointer:
  """Saves/restores {"state": pytree, "data_iterator": this process's JSON state} under
  WORKDIR/checkpoints. `async_save=False` makes every save block until it is on disk."""

  def __init__(self, workdir, keep=3, async_save=True):
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state, data_state=None, force=True):
    """Starts saving `state` and this process's `data_state` (a JSON-serialisable dict) as
    `step`; returns once the arrays are copied to host memory. Every process calls it."""
    args = ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardSave(state),
        DATA_ITEM: grain.checkpoint.CheckpointSave(
            _SavedIteratorState(data_state if data_state is not None else {}))})
    saved = self.manager.save(int(step), args=args, force=force)
    if saved:
      logging.info("saving checkpoint step %d to %s", step, self.directory)
    return saved

  def wait(self):
    """Blocks until the save in flight (if any) is complete on disk."""
    self.manager.wait_until_finished()

  def restore(self, abstract_state, step=None):
    """Restores into the shardings of `abstract_state` (a pytree of ShapeDtypeStruct with
    .sharding, or real arrays). Returns (state, this process's data state) or (None, None)
    without a checkpoint."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None, None
    step = int(step)
    target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
    items = {STATE_ITEM: ocp.args.StandardRestore(target)}
    step_dir = self.directory / str(step)
    data_state = None
    if (step_dir / DATA_ITEM).is_dir():
      data_state = self._data_state_of_another_process_count(step_dir / DATA_ITEM, step)
      if data_state is None:
        items[DATA_ITEM] = grain.checkpoint.CheckpointRestore(_SavedIteratorState())
    elif (step_dir / LEGACY_DATA_ITEM).is_dir():
      items[LEGACY_DATA_ITEM] = ocp.args.JsonRestore()
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except ValueError as error:  # orbax's shape/structure mismatch messages lack the context
      raise ValueError(
          f"checkpoint step {step} in {self.directory} does not fit the train state of this "
          f"config: {error}\nA workdir holds one model: resume it with the config it was "
          "started with, or give a new --workdir.") from error
    if DATA_ITEM in items:
      data_state = restored[DATA_ITEM].state
    elif LEGACY_DATA_ITEM in items:
      data_state = restored[LEGACY_DATA_ITEM]
    logging.info("restored checkpoint step %d from %s", step, self.directory)
    return restored[STATE_ITEM], data_state if data_state is not None else {}

  @staticmethod
  def _data_state_of_another_process_count(folder, step):
    """None when the checkpoint has a state file for every process of this job (orbax then
    restores this process's own). Otherwise the state that every saving process had, if they
    all had the same; ValueError when they differ, naming both process counts."""
    files = {}
    for path in folder.iterdir():
      match = _PROCESS_FILE.fullmatch(path.name)
      if match:
        files[(int(match.group(1)), int(match.group(2)))] = path
    count = jax.process_count()
    if (jax.process_index(), count) in files:
      return None
    saved_counts = sorted({n for _, n in files})
    if len(saved_counts) != 1:
      found = sorted(p.name for p in files.values())
      raise ValueError(f"checkpoint step {step}: {folder} holds no set of data iterator states "
                       f"process_<i>-of-<n>.json of one job (found {found}); the checkpoint is "
                       "damaged: resume from an earlier step or start a new --workdir.")
    states = {path.read_text() for path in files.values()}
    if len(states) != 1 or len(files) != saved_counts[0]:
      raise ValueError(
          f"checkpoint step {step} was written by {saved_counts[0]} processes whose data "
          f"iterators were at different positions ({folder}); this job has {count}. Resume it "
          f"with {saved_counts[0]} processes, or start a new --workdir.")
    return json.loads(states.pop())

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
