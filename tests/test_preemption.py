"""Staying up: SIGTERM saves and exits 0, the same command resumes, and a run killed with SIGKILL
at a random point resumes to bit-identical params and data order. In this process (fast):
preemption.py's flag, its DETAILFLOW_SIGTERM_AT hook, and the training loop saving the step it
stops at. Elsewhere: SIGTERM to one process of a two-process job (tests/test_distributed.py), a
two-process job killed and resumed (tests/test_checkpoints.py), the pipeline's stages
(tests/test_pipeline.py)."""
import os
import random
import signal
import time

import numpy as np
import pytest

from scripts import training_runs as runs

K = 3  # checkpoint interval of the single-process runs; they train 2K steps
SHORT_RUN = [f"--config.train.num_steps={2 * K}", "--config.train.log_every=1",
             f"--config.train.checkpoint_every={K}"]


@pytest.fixture(scope="module")
def single_env(tmp_path_factory):
  """One CPU device and a compilation cache shared by every single-process run here: they
  all train the same config, so only the first one compiles."""
  cache = tmp_path_factory.getbasetemp() / "xla_cache_single_device"
  return runs.cpu_env(1, DETAILFLOW_TEST_CACHE=cache)


def test_sigterm_saves_and_exits_zero_then_the_same_command_resumes(tmp_path, fake_fmnist_dir,
                                                                     single_env):
  command = runs.train_steps_command(tmp_path / "run", fake_fmnist_dir, *SHORT_RUN,
                                     "--seconds_per_step=0.3")
  first = runs.start(command, single_env)
  first.wait_for(r'^METRICS .*"step": 1[,}]')
  first.process.send_signal(signal.SIGTERM)
  saved = int(first.wait_for(r"SIGTERM: saved step (\d+); exiting").group(1))
  status, lines = first.finish()
  assert status == 0, "\n".join(lines[-20:])
  assert saved < 2 * K and saved in runs.finished_steps(tmp_path / "run")
  assert "FINISHED" in lines  # train_and_evaluate returned normally

  # The same command picks up the checkpoint and trains on to the end.
  second = runs.start(command, single_env)
  second.wait_for(rf"resumed from step {saved} in ")
  first_step = int(second.wait_for(r'^METRICS .*"step": (\d+)').group(1))
  status, lines = second.finish()
  assert status == 0, "\n".join(lines[-20:])
  assert first_step == saved + 1 and runs.finished_steps(tmp_path / "run")[-1] == 2 * K


def test_resume_after_sigkill_is_bit_exact(tmp_path, fake_fmnist_dir, single_env):
  k, overrides, env = K, SHORT_RUN, single_env
  straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
  straight = runs.run(runs.train_steps_command(straight_dir, fake_fmnist_dir, *overrides), env)
  assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
  straight_metrics = {m["step"]: m for m in runs.metrics_lines(straight.stdout)}
  assert sorted(straight_metrics) == list(range(1, 2 * k + 1))

  # Steps slowed to 0.4 s: the kill lands somewhere in steps k+1..2k or the step-2k save.
  seed = int.from_bytes(os.urandom(4), "little")
  delay = random.Random(seed).uniform(0.0, 1.2)
  killed = runs.start(runs.train_steps_command(killed_dir, fake_fmnist_dir, *overrides,
                                               "--seconds_per_step=0.4"), env)
  killed.wait_for(rf'^METRICS .*"step": {k + 1}[,}}]')
  deadline = time.monotonic() + 60
  while k not in runs.finished_steps(killed_dir) and time.monotonic() < deadline:
    time.sleep(0.02)  # checkpoint k is written asynchronously: let it land before the kill
  time.sleep(delay)
  killed.process.send_signal(signal.SIGKILL)
  status, _ = killed.finish()
  assert status == -signal.SIGKILL, f"the run finished before the kill (seed {seed})"
  assert k in runs.finished_steps(killed_dir)

  resumed = runs.run(runs.train_steps_command(killed_dir, fake_fmnist_dir, *overrides), env)
  assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
  resumed_metrics = runs.metrics_lines(resumed.stdout)
  context = f"(kill {delay:.2f} s after step {k + 1} began, seed {seed})"
  assert resumed_metrics and resumed_metrics[0]["step"] > k, context
  for metrics in resumed_metrics:  # the same batches in the same order give the same losses
    expected = straight_metrics[metrics["step"]]
    assert metrics["loss"] == expected["loss"], context
    assert metrics["mse_loss"] == expected["mse_loss"], context

  final_straight = runs.flat_with_paths(runs.restore_numpy(straight_dir, 2 * k))
  final_resumed = runs.flat_with_paths(runs.restore_numpy(killed_dir, 2 * k))
  assert final_straight.keys() == final_resumed.keys()
  for key, value in final_straight.items():
    np.testing.assert_array_equal(final_resumed[key], value, err_msg=f"{key} {context}")
  assert runs.data_states(killed_dir, 2 * k) == runs.data_states(straight_dir, 2 * k)


# --- preemption.py in this process --------------------------------------------------------------

@pytest.fixture
def fresh_preemption(monkeypatch):
  from detailflow_jax import preemption  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv(preemption.SIGTERM_AT_ENV, raising=False)
  preemption.clear()
  yield preemption
  preemption.clear()


def test_sigterm_caught_sets_the_flag_nests_and_restores_the_handler(fresh_preemption):
  preemption = fresh_preemption
  before = signal.getsignal(signal.SIGTERM)
  with preemption.sigterm_caught():
    with preemption.sigterm_caught():
      assert not preemption.stop_requested()
    inner_exit = signal.getsignal(signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)   # handled: the test process lives on
    assert preemption.stop_requested() and preemption.reached("extract_batch")
    assert preemption.train_step_boundary("ar_step")
  assert inner_exit is not before          # the inner context left the outer handler in place
  assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_at_signals_at_the_kth_visit_of_a_point(fresh_preemption, monkeypatch):
  preemption = fresh_preemption
  monkeypatch.setenv(preemption.SIGTERM_AT_ENV, "extract_batch:2")
  with preemption.sigterm_caught():
    assert not preemption.reached("extract_batch")
    assert not preemption.reached("sample_batch")
    assert preemption.reached("extract_batch")
  monkeypatch.setenv(preemption.SIGTERM_AT_ENV, "extract_shard:1")
  with pytest.raises(ValueError, match="'extract_shard' is not a safe point"):
    preemption.reached("extract_batch")


def test_the_loop_saves_the_step_it_stops_at_and_returns(fresh_preemption, monkeypatch, tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from detailflow_jax.train import checkpoints  # pylint: disable=g-import-not-at-top
  from detailflow_jax.train import loop  # pylint: disable=g-import-not-at-top
  preemption = fresh_preemption
  monkeypatch.setenv(preemption.SIGTERM_AT_ENV, "ar_step:3")
  state = {"w": jnp.zeros((3,)), "step": jnp.zeros((), jnp.int32)}
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)

  class Data:
    index = 0

    def __next__(self):
      self.index += 1
      return self.index

    def get_state(self):
      return {"next_index": self.index}

    def set_state(self, data_state):
      self.index = data_state["next_index"]

  def step_fn(state, batch, step):
    del batch, step
    return {"w": state["w"] + 1.0, "step": state["step"] + 1}, {"loss": jnp.float32(1.0)}

  out = loop.run(workdir=str(tmp_path), state=state, abstract_state=abstract, step_fn=step_fn,
                 data_iterator=Data(), num_steps=10, log_every=5, checkpoint_every=5,
                 keep_checkpoints=5, step_of=lambda s: s["step"], name="ar")
  assert int(out["step"]) == 3 and preemption.stop_requested()
  checkpointer = checkpoints.Checkpointer(tmp_path)
  assert checkpointer.latest_step() == 3   # saved although 3 is no checkpoint step
  _, data_state = checkpointer.restore(abstract)
  checkpointer.close()
  assert data_state == {"next_index": 3}
