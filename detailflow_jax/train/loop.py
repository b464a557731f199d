"""The training loop shared by the tokenizer and AR trainers.

A trainer provides: an initial sharded state, a `step(state, batch) -> (state, metrics)` that
is already jitted, a data iterator with get_state/set_state, and optional periodic callbacks.
This loop owns resuming, checkpointing (with every process's iterator state), metric writing, the
progress line, NaN/inf detection and SIGTERM handling: at the next step boundary (the same step on
every process) it saves that step and returns; `preemption.stop_requested()` then tells the caller
that the run stopped early (preemption.py). Checkpoints are written asynchronously
(train/checkpoints.py): the loop waits for a write only at the next save and before it returns,
so a returned run (finished, stopped, or failed) has its last checkpoint complete on disk.
"""
import contextlib
import dataclasses
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
from absl import logging

from detailflow_jax import preemption
from detailflow_jax.train import checkpoints
from detailflow_jax.train import metrics_writer


class NonFiniteLossError(RuntimeError):
  pass


@dataclasses.dataclass
class LoopHooks:
  """Periodic work besides the step; each gets (step, state)."""
  every: int = 0
  fn: Optional[Callable[[int, Any], None]] = None


def run(*, workdir, state, abstract_state, step_fn, data_iterator, num_steps,
        log_every, checkpoint_every, keep_checkpoints, hooks=(), metric_prefix="train",
        step_of=lambda s: s.step, on_metrics=None, name="train"):
  """Trains until `num_steps`, resuming from WORKDIR/checkpoints if present. Returns state, also
  when SIGTERM stopped it early (its step saved; preemption.stop_requested() is then True).
  `name` names the run in messages and its safe point "<name>_step" (preemption.POINTS)."""
  checkpointer = checkpoints.Checkpointer(workdir, keep=keep_checkpoints)
  restored, data_state = checkpointer.restore(abstract_state)
  if restored is not None:
    state = restored
    if data_state:
      data_iterator.set_state(data_state)
  start = int(step_of(state))
  if start >= num_steps:
    logging.info("checkpoint already at step %d >= num_steps %d; nothing to train", start, num_steps)
    checkpointer.close()
    return state
  if start:
    print(f"resumed from step {start} in {workdir}", flush=True)
  if preemption.stop_requested():  # SIGTERM while the trainer was getting ready
    checkpointer.close()
    print(f"SIGTERM before step {start + 1} of {num_steps} ({name}); nothing new to save. Run "
          "the same command to resume.", flush=True)
    return state

  writer = metrics_writer.create_writer(workdir)
  progress = metrics_writer.ProgressLine(num_steps, start)
  pending = []
  last_good_step = start
  with preemption.sigterm_caught(), _closing(writer, checkpointer):
    for step in range(start + 1, num_steps + 1):
      # The iterator state saved with a checkpoint must be the one *before* the next batch.
      # step_fn gets the host batch: it reads the batch's static settings (output size,
      # correction on/off) without a device round-trip, then shards it.
      state, metrics = step_fn(state, next(data_iterator), step)
      pending.append(metrics)
      if step % log_every == 0 or step == num_steps:
        host = jax.device_get(pending)
        pending = []
        # Metric sets differ between step variants (e.g. GAN terms appear at gan_start_step).
        keys = sorted({k for m in host for k in m})
        scalars = {k: float(np.mean([m[k] for m in host if k in m])) for k in keys}
        if not all(np.isfinite(v) for k, v in scalars.items() if "loss" in k):
          raise NonFiniteLossError(
              f"non-finite loss at step {step}: {scalars}. Training stopped; the last good "
              f"checkpoint (step {last_good_step}) in {checkpointer.directory} is intact.")
        if on_metrics is not None:
          on_metrics(dict(scalars, step=step))
        rate = progress(step, scalars)
        scalars["steps_per_sec"] = rate
        writer.write_scalars(step, {f"{metric_prefix}/{k}": v for k, v in scalars.items()})
      stop = preemption.train_step_boundary(f"{name}_step")
      if step % checkpoint_every == 0 or step == num_steps or stop:
        if pending:  # never checkpoint a state whose losses were not checked
          host = jax.device_get(pending)
          if not all(np.isfinite(float(v)) for m in host for k, v in m.items() if "loss" in k):
            raise NonFiniteLossError(
                f"non-finite loss before step {step}; the last good checkpoint "
                f"(step {last_good_step}) in {checkpointer.directory} is intact.")
        # Asynchronous: orbax copies the state to host memory and writes it on a thread while
        # the next steps run (the next save, the SIGTERM exit and `_closing` wait for it).
        checkpointer.save(step, state, data_iterator.get_state())
        last_good_step = step
      for hook in hooks:
        if hook.every and step % hook.every == 0:
          hook.fn(step, state)
      if stop:
        checkpointer.wait()  # on disk before we say so; the process may be gone soon after
        print(f"SIGTERM: saved step {step}; exiting ({name}: {step} of {num_steps} steps). Run "
              "the same command to resume.", flush=True)
        break
  return state


@contextlib.contextmanager
def _closing(writer, checkpointer):
  try:
    yield
  finally:
    writer.flush()
    checkpointer.close()
