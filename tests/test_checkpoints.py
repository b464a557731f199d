"""train/checkpoints.py: every process's data iterator state is saved and restored (a 2-process
job killed with SIGKILL resumes bit-exact), older checkpoints with one JSON state still restore,
and a change of process count is accepted only when the saved states do not depend on it."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from detailflow_jax.train import checkpoints
from scripts import training_runs as runs

SCRIPT = str(runs.REPO / "tests" / "scripts" / "process_data_training.py")


def small_state(value):
  return {"w": jnp.full((2, 3), float(value)), "step": jnp.asarray(value, jnp.int32)}


ABSTRACT = {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32),
            "step": jax.ShapeDtypeStruct((), jnp.int32)}


def test_the_iterator_state_is_saved_per_process_and_restored(tmp_path):
  checkpointer = checkpoints.Checkpointer(tmp_path, keep=2)
  assert checkpointer.save(3, small_state(3), {"next_index": 7})
  checkpointer.close()
  files = list((tmp_path / "checkpoints" / "3" / "data_iterator").glob("process_*.json"))
  assert [f.name for f in files] == ["process_0-of-1.json"]
  assert json.loads(files[0].read_text()) == {"next_index": 7}
  checkpointer = checkpoints.Checkpointer(tmp_path, keep=2)
  state, data = checkpointer.restore(ABSTRACT)
  checkpointer.close()
  assert int(state["step"]) == 3 and float(state["w"][1, 2]) == 3.0 and data == {"next_index": 7}


def test_a_checkpoint_with_one_json_data_state_still_restores(tmp_path):
  """The layout before per-process states: item "data", one JSON written by process 0."""
  manager = ocp.CheckpointManager((tmp_path / "checkpoints").absolute())
  manager.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(small_state(5)),
                                          data=ocp.args.JsonSave({"next_index": 5})))
  manager.wait_until_finished()
  manager.close()
  checkpointer = checkpoints.Checkpointer(tmp_path)
  state, data = checkpointer.restore(ABSTRACT)
  checkpointer.close()
  assert int(state["step"]) == 5 and data == {"next_index": 5}


def _as_if_saved_by_two_processes(workdir, step, states):
  folder = workdir / "checkpoints" / str(step) / "data_iterator"
  (folder / "process_0-of-1.json").unlink()
  for index, state in enumerate(states):
    (folder / f"process_{index}-of-2.json").write_text(json.dumps(state))


def test_another_process_count_restores_only_a_state_shared_by_every_process(tmp_path):
  checkpointer = checkpoints.Checkpointer(tmp_path, keep=3)
  checkpointer.save(1, small_state(1), {"next_index": 1})
  checkpointer.save(2, small_state(2), {"next_index": 2})
  checkpointer.close()
  _as_if_saved_by_two_processes(tmp_path, 1, [{"next_index": 9}, {"next_index": 9}])
  _as_if_saved_by_two_processes(tmp_path, 2, [{"next_index": 2}, {"next_index": 5}])
  checkpointer = checkpoints.Checkpointer(tmp_path, keep=3)
  state, data = checkpointer.restore(ABSTRACT, step=1)
  assert int(state["step"]) == 1 and data == {"next_index": 9}
  with pytest.raises(ValueError, match=r"checkpoint step 2 was written by 2 processes whose data "
                                       r"iterators were at different positions .*this job has "
                                       r"1\. Resume it with 2 processes"):
    checkpointer.restore(ABSTRACT, step=2)
  checkpointer.close()


def test_save_returns_before_the_write_and_wait_completes_it(tmp_path):
  """Asynchronous saving: the step appears only once the write is done; `wait` finishes it."""
  checkpointer = checkpoints.Checkpointer(tmp_path, keep=2)
  rng = np.random.default_rng(0)
  large = dict(small_state(4), extra=[jnp.asarray(rng.standard_normal(1 << 20, np.float32))
                                      for _ in range(16)])   # 64 MiB: written in well over 1 ms
  checkpointer.save(4, large, {"next_index": 4})
  in_flight = not (tmp_path / "checkpoints" / "4").exists()
  checkpointer.wait()
  assert in_flight, "save() returned after the checkpoint was already on disk"
  assert runs.finished_steps(tmp_path) == [4] and checkpointer.latest_step() == 4
  checkpointer.close()


# --- a 2-process job killed and resumed ------------------------------------------------------

class TwoProcessRun:
  """launch/local_multiprocess.sh 2 1 on process_data_training.py; each process writes its own
  log (lines of two processes sharing one pipe could interleave)."""

  def __init__(self, logs, workdir, steps, every, *extra):
    self.logs = logs
    command = [runs.LAUNCH_LOCAL, "2", "1", sys.executable, SCRIPT, str(workdir), str(steps),
               str(every), *extra]
    self.process = subprocess.Popen(command, cwd=runs.REPO, env=runs.cpu_env(LOCAL_LOG_DIR=logs),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

  def lines(self, index):
    path = self.logs / f"process_{index}.log"
    return path.read_text(errors="replace").splitlines() if path.exists() else []

  def wait_for(self, pattern, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if any(re.search(pattern, line) for line in self.lines(0)):
        return
      if self.process.poll() is not None:
        break
      time.sleep(0.02)
    raise AssertionError(f"process 0 printed no line matching {pattern!r}:\n"
                         + "\n".join(self.lines(0)[-30:]))

  def finish(self, timeout=600):
    status = self.process.wait(timeout=timeout)
    return status, [self.lines(0), self.lines(1)]

  def output(self):
    return "\n".join(f"process {i}: {line}" for i in range(2) for line in self.lines(i)[-20:])


def losses_by_step(lines_per_process):
  """{step: loss}, checking that every process logged the same loss at every step."""
  by_process = [{m["step"]: m["loss"] for m in runs.metrics_lines("\n".join(lines))}
                for lines in lines_per_process]
  assert by_process[0] == by_process[1], by_process
  return by_process[0]


def test_two_processes_killed_resume_each_iterator_and_match_an_uninterrupted_run(tmp_path):
  steps, every = 8, 3
  straight = TwoProcessRun(tmp_path / "logs_straight", tmp_path / "straight", steps, every)
  status, lines = straight.finish()
  assert status == 0, straight.output()
  expected = losses_by_step(lines)
  assert sorted(expected) == list(range(1, steps + 1))

  seed = int.from_bytes(os.urandom(4), "little")
  delay = random.Random(seed).uniform(0.0, 0.8)
  killed_dir = tmp_path / "killed"
  killed = TwoProcessRun(tmp_path / "logs_killed", killed_dir, steps, every, "0.25")
  killed.wait_for(rf'^METRICS .*"step": {every + 1}[,}}]')
  deadline = time.monotonic() + 60
  while every not in runs.finished_steps(killed_dir) and time.monotonic() < deadline:
    time.sleep(0.02)   # the save of step `every` is asynchronous: let it land first
  time.sleep(delay)
  for pid in runs.child_pids(killed.process.pid):
    try:
      os.kill(pid, signal.SIGKILL)   # both processes at once, no grace period
    except ProcessLookupError:
      pass   # this one ended between the listing and the kill: it has nothing left to lose
  status, lines = killed.finish()
  context = f"(kill {delay:.2f} s after step {every} was on disk, seed {seed})"
  assert status != 0 and not any(l.startswith("FINISHED") for l in lines[0] + lines[1]), context
  saved = runs.finished_steps(killed_dir)
  assert every in saved and saved[-1] < steps, context

  resumed = TwoProcessRun(tmp_path / "logs_resumed", killed_dir, steps, every)
  status, lines = resumed.finish()
  assert status == 0, resumed.output() + context
  for process_lines in lines:
    assert f"resumed from step {saved[-1]} in {killed_dir}" in process_lines, context
  got = losses_by_step(lines)
  assert sorted(got) == list(range(saved[-1] + 1, steps + 1)), context
  for step, loss in got.items():   # the same rows in the same order give the same losses
    assert loss == expected[step], f"step {step} {context}"

  final = runs.restore_numpy(killed_dir, steps)
  np.testing.assert_array_equal(final["w"], runs.restore_numpy(tmp_path / "straight", steps)["w"])
  states = runs.data_states(killed_dir, steps)
  assert states == runs.data_states(tmp_path / "straight", steps)
  # Each process kept its own position: process 1 started OFFSET = 3 batches further on.
  assert len(states) == 2 and states[0] != states[1], states
