"""Orbax checkpoints of a train state plus the data iterator's state.

Orbax writes each step to a temporary folder and renames it when complete, so a crash during a
save leaves the previous step restorable; `keep` bounds how many steps stay on disk.
"""
import pathlib

import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
  """Saves/restores {"state": pytree, "data": JSON} under WORKDIR/checkpoints."""

  def __init__(self, workdir, keep=3, async_save=False):
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data"))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state, data_state=None, force=True):
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state if data_state is not None else {}))
    saved = self.manager.save(int(step), args=args, force=force)
    if saved:
      logging.info("saved checkpoint step %d to %s", step, self.directory)
    return saved

  def wait(self):
    self.manager.wait_until_finished()

  def restore(self, abstract_state, step=None):
    """Restores into the shardings of `abstract_state` (a pytree of ShapeDtypeStruct with
    .sharding, or real arrays). Returns (state, data_state) or (None, None) without a checkpoint."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None, None
    target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
    try:
      restored = self.manager.restore(
          int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                             data=ocp.args.JsonRestore()))
    except ValueError as error:  # orbax's shape/structure mismatch messages lack the context
      raise ValueError(
          f"checkpoint step {step} in {self.directory} does not fit the train state of this "
          f"config: {error}\nA workdir holds one model: resume it with the config it was "
          "started with, or give a new --workdir.") from error
    logging.info("restored checkpoint step %d from %s", step, self.directory)
    return restored["state"], restored["data"]

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
