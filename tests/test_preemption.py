"""Staying up: SIGTERM saves and exits 0 (one process and a two-process job), the same command
resumes, and a run killed with SIGKILL at a random point resumes to bit-identical params and
data order."""
import os
import random
import re
import signal
import time

import numpy as np
import pytest

from scripts import training_runs as runs

LONG_RUN = ["--config.train.num_steps=100000", "--config.train.log_every=1",
            "--config.train.checkpoint_every=100000"]
K = 3  # checkpoint interval of the single-process runs; they train 2K steps
SHORT_RUN = [f"--config.train.num_steps={2 * K}", "--config.train.log_every=1",
             f"--config.train.checkpoint_every={K}"]


@pytest.fixture(scope="module")
def single_env(tmp_path_factory):
  """One CPU device and a compilation cache shared by every single-process run here: they
  all train the same config, so only the first one compiles."""
  cache = tmp_path_factory.getbasetemp() / "xla_cache_single_device"
  return runs.cpu_env(1, DETAILFLOW_TEST_CACHE=cache)


@pytest.mark.slow
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


@pytest.mark.slow
def test_sigterm_to_one_process_stops_the_whole_job_at_one_step(tmp_path, fake_fmnist_dir):
  workdir = tmp_path / "run"
  command = [runs.LAUNCH_LOCAL, "2", "1",
             *runs.main_command(workdir, fake_fmnist_dir, *LONG_RUN, "--config.mesh.data=2")]
  job = runs.start(command, runs.cpu_env())
  job.wait_for(r"^step 2/100000")   # printed by process 0
  launcher = job.process.pid
  by_id = {runs.process_env(pid).get("JAX_PROCESS_ID"): pid for pid in runs.child_pids(launcher)}
  os.kill(by_id["1"], signal.SIGTERM)  # as a preempted host would get it; process 0 gets none
  status, lines = job.finish()
  output = "\n".join(lines)
  assert status == 0, output[-4000:]
  steps = sorted({int(s) for s in re.findall(r"SIGTERM: saved step (\d+)", output)})
  assert len(steps) == 1, output[-4000:]   # both processes report the same step
  assert runs.finished_steps(workdir) == steps
  state_dir = workdir / "checkpoints" / str(steps[0]) / "state"
  assert (state_dir / "ocdbt.process_0").is_dir() and (state_dir / "ocdbt.process_1").is_dir()


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
  killed.wait_for(rf'^METRICS .*"step": {k + 1}[,}}]')  # checkpoint k is complete by now
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
  assert runs.data_state(killed_dir, 2 * k) == runs.data_state(straight_dir, 2 * k)
