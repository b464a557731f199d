"""SIGTERM stops a job at its next safe point with its work on disk; the process exits 0.

SIGTERM is what a preempted TPU or spot VM, a SLURM requeue and `kill` send. Every job keeps one
promise: what it finished is on disk, the process exits with status 0 without starting anything
else, and the same command resumes. The safe points:
  - training steps (train/loop.py): the step's checkpoint is saved, then the trainer returns;
  - code extraction batches: finished shards are on disk; the shard in progress is redone;
  - tokenizer evaluation, sampling, Inception batches and judge epochs: these jobs write their
    outputs only when complete (atomically), so a stopped one leaves none and a rerun redoes it;
  - the pipeline's stage boundaries (jobs/pipeline.py): no later stage starts (the study job
    runs its arms as pipelines, so no later arm starts either).
A job stopped at a safe point raises `Preempted` (a trainer returns instead, its checkpoint
saved; the pipeline raises after it); main.py prints the message and exits with status 0.

Who catches SIGTERM:
  - one process: a Python handler that only sets a flag (`sigterm_caught`: main.py holds it
    around every job, the training loop around its steps for callers that bypass main.py);
  - several processes with JAX's preemption service (jax.distributed; on by default): JAX's
    runtime owns SIGTERM. A Python handler would replace the runtime's, which would then never
    hear of the preemption, so none is installed. The training loop asks the runtime at every
    step (`train_step_boundary`) and every process stops at the step the runtime picks: one past
    the latest count any process had reported when the notice arrived. The count runs over the
    whole process, not per trainer, so a notice that lands between two trainers (during code
    extraction, say) stops the next trainer at its first step. Safe points outside training do
    not stop a multi-process job (one process stopping alone would leave the others waiting at
    their next collective); their outputs are atomic, and extraction resumes its shards.

Testing aid: DETAILFLOW_SIGTERM_AT=<point>:<k> makes the process send itself SIGTERM the k-th
time it reaches the safe point named <point> (names: POINTS), so a test stops a job at a chosen
place without timing it.
"""
import contextlib
import os
import signal

import jax
import numpy as np

SIGTERM_AT_ENV = "DETAILFLOW_SIGTERM_AT"
# Safe points by name (DETAILFLOW_SIGTERM_AT): "<trainer>_step" is the training loop's (its
# `name`: tokenizer, decoder, ar); the others are where the jobs check between batches.
POINTS = ("tokenizer_step", "decoder_step", "ar_step", "extract_batch", "eval_tokenizer_batch",
          "sample_batch", "judge_epoch", "judge", "inception_batch", "eval_generator_batch",
          "stage_end")


class Preempted(Exception):
  """A job stopped at a safe point after SIGTERM; the message says what is saved and how to
  resume. main.py prints it and exits with status 0."""


class _State:

  def __init__(self):
    self.received = False   # this process got SIGTERM (the Python handler's flag)
    self.agreed = False     # every process agreed to stop (at a training step boundary)
    self.step_boundaries = 0  # training step boundaries passed here (the runtime's count)
    self.visits = {}        # safe point -> times reached (for DETAILFLOW_SIGTERM_AT)


_state = _State()


def _on_sigterm(signum, frame):
  del signum, frame
  _state.received = True


def runtime_owns_sigterm():
  """True when JAX's preemption service handles SIGTERM (several processes)."""
  return jax.process_count() > 1 and jax.config.jax_enable_preemption_service


@contextlib.contextmanager
def sigterm_caught():
  """Within it, SIGTERM sets the stop flag instead of ending the process (not when JAX's runtime
  owns SIGTERM, see the module docstring). Nests; the previous handler comes back on exit."""
  previous = None
  if not runtime_owns_sigterm() and signal.getsignal(signal.SIGTERM) is not _on_sigterm:
    try:
      previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: signals cannot be handled here
      previous = None
  try:
    yield
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)


def stop_requested():
  """True once this job must stop. One process: it got SIGTERM. Several: every process agreed
  at a training step boundary (a flag of one process alone is not acted on)."""
  if jax.process_count() == 1:
    return _state.received
  return _state.agreed


def reached(point):
  """A safe point outside training, named `point`: True when the job must stop here (see
  stop_requested). Call where nothing half-written is left behind."""
  _test_signal(point)
  return stop_requested()


def train_step_boundary(point):
  """The training loop's check, at every step on every process (the same steps): True once all
  processes must stop, at the same step; the caller then saves that step's checkpoint."""
  _test_signal(point)
  _state.step_boundaries += 1
  if jax.process_count() == 1:
    stop = _state.received
  else:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    if runtime_owns_sigterm():
      stop = multihost_utils.reached_preemption_sync_point(_state.step_boundaries)
    else:  # no preemption service: the processes agree through a collective
      flags = multihost_utils.process_allgather(np.asarray(_state.received, np.int32))
      stop = bool(np.any(flags))
  if stop:
    _state.agreed = True
  return stop


def _test_signal(point):
  """DETAILFLOW_SIGTERM_AT=<point>:<k>: SIGTERM to this process at the k-th visit of `point`."""
  spec = os.environ.get(SIGTERM_AT_ENV, "")
  if not spec:
    return
  name, _, count = spec.partition(":")
  if name not in POINTS:
    raise ValueError(f"{SIGTERM_AT_ENV}={spec!r}: {name!r} is not a safe point; one of {POINTS}")
  if name != point:
    return
  visits = _state.visits[point] = _state.visits.get(point, 0) + 1
  if visits == int(count or 1):
    # A Python handler runs before os.kill returns (CPython checks signals sent to itself).
    os.kill(os.getpid(), signal.SIGTERM)


def clear():
  """Forgets a SIGTERM already acted on, and the counts: for a caller that goes on in the same
  process (a test that resumes a stopped trainer in-process). A new process starts clear."""
  global _state
  _state = _State()
