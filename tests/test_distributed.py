"""Multi-process start-up (distributed.py), the local launcher, and 2 processes x 4 devices
against 1 process x 8 devices through the launcher and main.py, stopped by SIGTERM to one
process."""
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from detailflow_jax import distributed
from scripts import training_runs as runs

# Losses of 2 processes x 4 devices vs 1 process x 8 devices on the same data x fsdp mesh differ
# only in the order of cross-process sums (measured: <= 2e-7 relative over 20 steps).
LOSS_RTOL = 1e-5


# --- distributed.resolve: which processes form the job ---------------------------------------

def test_single_process_without_settings():
  plan = distributed.resolve(env={})
  assert plan.source == "single" and not plan.call_initialize
  assert distributed.initialize(env={}) == plan  # a no-op: JAX stays single-process


def test_flags_win_over_environment():
  env = {"JAX_COORDINATOR_ADDRESS": "other:1", "JAX_NUM_PROCESSES": "8", "JAX_PROCESS_ID": "7"}
  plan = distributed.resolve(coordinator_address="head:1234", num_processes=4, process_id=2,
                             local_device_ids="0,1", env=env)
  assert plan == distributed.Plan("flags", "head:1234", 4, 2, (0, 1))
  assert plan.call_initialize


def test_environment_of_the_local_launcher():
  env = {"JAX_COORDINATOR_ADDRESS": "localhost:5000", "JAX_NUM_PROCESSES": "2",
         "JAX_PROCESS_ID": "1"}
  assert distributed.resolve(env=env) == distributed.Plan("env", "localhost:5000", 2, 1)
  one = dict(env, JAX_NUM_PROCESSES="1", JAX_PROCESS_ID="0")
  assert distributed.resolve(env=one).source == "single"


def test_slurm_step_is_left_to_jax():
  env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "h100-[01-04]", "SLURM_NTASKS": "32",
         "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "8"}
  # jax.distributed.initialize() reads coordinator, port, process id and local GPU itself.
  plan = distributed.resolve(env=env)
  assert plan == distributed.Plan("slurm") and plan.call_initialize
  # A one-task allocation (an interactive salloc shell) is a single process.
  assert distributed.resolve(env=dict(env, SLURM_NTASKS="1", SLURM_PROCID="0")).source == "single"
  # Explicit settings still win.
  assert distributed.resolve(env=dict(env, JAX_COORDINATOR_ADDRESS="h:1", JAX_NUM_PROCESSES="2",
                                      JAX_PROCESS_ID="1")).source == "env"


def test_tpu_and_modes():
  assert distributed.resolve(env={"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3"}).source == "tpu"
  assert distributed.resolve(env={"TPU_WORKER_HOSTNAMES": "localhost"}).source == "single"
  assert distributed.resolve(env={"MEGASCALE_NUM_SLICES": "2"}).source == "tpu"
  assert distributed.resolve("detect", env={}) == distributed.Plan("detect")
  assert distributed.resolve(env={"OMPI_COMM_WORLD_SIZE": "4"}).source == "mpi"
  assert distributed.resolve(env={"OMPI_COMM_WORLD_SIZE": "1"}).source == "single"
  slurm = {"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "a,b", "SLURM_NTASKS": "2",
           "SLURM_PROCID": "0"}
  assert distributed.resolve("off", env=slurm).source == "off"


@pytest.mark.parametrize("kwargs, env, message", [
    (dict(num_processes=2, process_id=0), {}, "--coordinator_address missing"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), {},
     r"process_id=2 must be in \[0, num_processes=2\)"),
    (dict(coordinator_address="head", num_processes=2, process_id=0), {}, "must be host:port"),
    (dict(coordinator_address="h:1", num_processes="two", process_id=0), {},
     "num_processes='two' is not an integer"),
    ({}, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID missing"),
    (dict(mode="sometimes"), {}, "distributed mode 'sometimes' is not one of"),
])
def test_bad_settings(kwargs, env, message):
  with pytest.raises(ValueError, match=message):
    distributed.resolve(env=env, **kwargs)


# --- the local launcher ---------------------------------------------------------------------

def test_launcher_environment_and_exit_status(tmp_path):
  script = ('echo "$JAX_PROCESS_ID/$JAX_NUM_PROCESSES $JAX_COORDINATOR_ADDRESS $JAX_PLATFORMS '
            '$XLA_FLAGS" > "$0/p$JAX_PROCESS_ID"; exit $((JAX_PROCESS_ID * 3))')
  out = subprocess.run([runs.LAUNCH_LOCAL, "2", "3", "bash", "-c", script, str(tmp_path)],
                       capture_output=True, text=True, timeout=60, check=False)
  assert out.returncode == 3, out.stderr  # process 1's status
  lines = [(tmp_path / f"p{i}").read_text().split() for i in range(2)]
  assert [l[0] for l in lines] == ["0/2", "1/2"]
  assert lines[0][1] == lines[1][1] and lines[0][1].startswith("localhost:")
  assert lines[0][2] == "cpu" and lines[0][3] == "--xla_force_host_platform_device_count=3"
  usage = subprocess.run([runs.LAUNCH_LOCAL, "2", "x", "true"], capture_output=True, text=True,
                         timeout=60, check=False)
  assert usage.returncode == 2
  assert "must be positive integers, got 'x'" in usage.stderr


# --- 2 processes x 4 devices == 1 process x 8 devices; SIGTERM to one process -----------------

def _wait_for_line(path, pattern, process, timeout=600):
  """Polls a log file until a line matches (each process of the launcher writes its own log:
  lines of two processes sharing one pipe could interleave)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    if any(re.search(pattern, line) for line in lines):
      return
    if process.poll() is not None:
      break
    time.sleep(0.05)
  raise AssertionError(f"{path.name}: no line matching {pattern!r}; last lines:\n"
                       + "\n".join(lines[-30:]))


def test_two_processes_match_one_process_and_stop_together_on_sigterm(tmp_path, fake_fmnist_dir):
  """One training as 2 processes x 4 devices and as 1 process x 8 devices on the same data x fsdp
  mesh. SIGTERM to process 1 alone, as a preempted host gets it, stops both processes at one
  step, which they save, and the job exits 0; up to that step losses and params match the
  one-process run, which checkpoints every step and stops itself at step REFERENCE_STEPS."""
  reference_steps = 10
  overrides = ["--config.train.num_steps=100000", "--config.train.log_every=1",
               "--config.mesh.data=2", "--config.mesh.fsdp=4"]
  one_dir, two_dir, logs = tmp_path / "one_x8", tmp_path / "two_x4", tmp_path / "logs"
  # Both jobs at once: the two-process job spends much of its time waiting on gloo.
  with open(tmp_path / "one_x8.log", "w") as one_log:
    one = subprocess.Popen(
        runs.main_command(one_dir, fake_fmnist_dir, *overrides, "--config.train.checkpoint_every=1",
                          f"--config.train.keep_checkpoints={reference_steps}"),
        cwd=runs.REPO, stdout=one_log, stderr=subprocess.STDOUT,
        env=runs.cpu_env(8, DETAILFLOW_SIGTERM_AT=f"tokenizer_step:{reference_steps}"))
    two = subprocess.Popen(
        [runs.LAUNCH_LOCAL, "2", "4", *runs.main_command(
            two_dir, fake_fmnist_dir, *overrides, "--config.train.checkpoint_every=100000")],
        cwd=runs.REPO, env=runs.cpu_env(LOCAL_LOG_DIR=logs), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    _wait_for_line(logs / "process_0.log", r"^step 2/100000", two)
    by_id = {runs.process_env(pid).get("JAX_PROCESS_ID"): pid for pid in runs.child_pids(two.pid)}
    os.kill(by_id["1"], signal.SIGTERM)   # process 0 gets none
    two_status, one_status = two.wait(timeout=900), one.wait(timeout=900)
  output = "\n".join(p.read_text() for p in sorted(logs.glob("*.log")))
  assert two_status == 0, output[-4000:]
  assert one_status == 0, (tmp_path / "one_x8.log").read_text()[-3000:]
  saved = sorted({int(s) for s in re.findall(r"SIGTERM: saved step (\d+)", output)})
  assert len(saved) == 1, output[-4000:]   # both processes report the same step
  stop = saved[0]
  assert runs.finished_steps(two_dir) == [stop]
  assert 2 <= stop <= reference_steps, f"the job stopped at step {stop}, after the reference"

  single, multi = runs.read_scalars(one_dir), runs.read_scalars(two_dir)
  assert sorted(multi["train/loss"]) == list(range(1, stop + 1))
  for tag in ("train/loss", "train/mse_loss", "train/grad_norm"):
    a = np.array([single[tag][s] for s in range(1, stop + 1)])
    b = np.array([multi[tag][s] for s in range(1, stop + 1)])
    np.testing.assert_allclose(b, a, rtol=LOSS_RTOL, err_msg=tag)
  assert not np.allclose(single["train/loss"][1], single["train/loss"][reference_steps])

  # Only process 0 writes metrics; every process writes its checkpoint shards.
  assert len(runs.event_files(two_dir)) == 1
  state_dir = two_dir / "checkpoints" / str(stop) / "state"
  assert (state_dir / "ocdbt.process_0").is_dir() and (state_dir / "ocdbt.process_1").is_dir()
  # Each process saved its own iterator state; the tokenizer pipeline's is the global batch
  # index, the same in every process and for any process count.
  assert runs.data_states(two_dir, stop) == 2 * runs.data_states(one_dir, stop)
  params_one = runs.flat_with_paths(runs.restore_numpy(one_dir, stop)["params"])
  params_two = runs.flat_with_paths(runs.restore_numpy(two_dir, stop)["params"])
  assert params_one.keys() == params_two.keys()
  for key, value in params_one.items():
    if "k_proj']['bias" in key:
      continue  # the key bias has an exactly zero gradient (softmax ignores it): Adam amplifies
                # the float noise, so it is not comparable between the two summation orders
    np.testing.assert_allclose(params_two[key], value, rtol=1e-4, atol=1e-6, err_msg=key)


# --- the compile-ahead check ----------------------------------------------------------------

@pytest.mark.parametrize("config, devices, override, mesh, step", [
    ("ar_tiny.py:smoke", 8, "--config.mesh.fsdp=4", "{'data': 2, 'fsdp': 4, 'tensor': 1}",
     "train_ar step (batch 8)"),
    ("tokenizer_tiny.py:smoke", 2, "--config.mesh.fsdp=2", "{'data': 1, 'fsdp': 2, 'tensor': 1}",
     "train_tokenizer step (output 32px, correction True, gan False, batch 8)"),
])
def test_compile_check_prints_per_device_memory(config, devices, override, mesh, step):
  out = subprocess.run(
      [sys.executable, "-m", "detailflow_jax.compile_check",
       f"--config={runs.REPO / 'configs' / config}", f"--devices={devices}", override],
      cwd=runs.REPO, env=runs.cpu_env(), capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"mesh {mesh} over {devices} simulated devices" in out.stdout
  assert f"{step}: per-device memory" in out.stdout
  size = lambda match: float(match.group(1)) * {"MiB": 1, "GiB": 1024}[match.group(2)]
  state = size(re.search(r"train state shard\s+([\d.]+) (MiB|GiB)", out.stdout))
  total = size(re.search(r"total \(.*\)\s+([\d.]+) (MiB|GiB)", out.stdout))
  assert 0 < state <= total
  assert out.stdout.rstrip().endswith("compile check passed")


@pytest.mark.parametrize("override, message", [
    ("--config.mesh.data=3", "needs 3 devices but 8 are available"),
    ("--config.data.batch_size=12", "data.batch_size=12 is not divisible by the data x fsdp "
                                    "mesh size 8"),
])
def test_compile_check_rejects_contradictions(override, message):
  out = subprocess.run(
      [sys.executable, "-m", "detailflow_jax.compile_check",
       f"--config={runs.REPO / 'configs' / 'ar_tiny.py'}:smoke", "--devices=8", override],
      cwd=runs.REPO, env=runs.cpu_env(), capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
  assert "error: " in out.stderr and message in out.stderr
