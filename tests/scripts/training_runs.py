"""Helpers for tests that start training processes: commands, environments, and reading back
what a run wrote (TensorBoard scalars, checkpointed arrays) without the run's mesh."""
import glob
import json
import os
import pathlib
import struct
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
SMOKE = str(REPO / "configs" / "tokenizer_tiny.py") + ":smoke"
LAUNCH_LOCAL = str(REPO / "launch" / "local_multiprocess.sh")
TRAIN_STEPS = str(REPO / "tests" / "scripts" / "train_steps.py")


def cpu_env(devices=None, **extra):
  """Environment of a CPU-only child process, optionally with `devices` simulated devices.
  The compilation cache of main.py is off unless a test asks for one."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", DETAILFLOW_COMPILATION_CACHE="")
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "XLA_FLAGS"):
    env.pop(key, None)
  if devices is not None:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env.update({k: str(v) for k, v in extra.items()})
  return env


def main_command(workdir, fmnist_dir, *overrides, config=SMOKE):
  """`python -m detailflow_jax.main` on the smoke tokenizer config with the fake dataset."""
  return [sys.executable, "-m", "detailflow_jax.main", f"--config={config}",
          f"--workdir={workdir}", f"--config.data.fashion_mnist_dir={fmnist_dir}", *overrides]


def train_steps_command(workdir, fmnist_dir, *overrides, config=SMOKE):
  """tests/scripts/train_steps.py (prints METRICS lines; --seconds_per_step=S slows it)."""
  return [sys.executable, TRAIN_STEPS, config, str(workdir),
          f"--config.data.fashion_mnist_dir={fmnist_dir}", *overrides]


def run(command, env, timeout=600):
  out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=timeout, check=False)
  return out


def metrics_lines(stdout):
  """The METRICS dicts printed by train_steps.py, in order."""
  return [json.loads(line[len("METRICS "):]) for line in stdout.splitlines()
          if line.startswith("METRICS ")]


def read_scalars(workdir):
  """{tag: {step: float32 value}} from the TensorBoard event files under WORKDIR/tensorboard
  (TFRecord framing: u64 length, u32 crc, payload, u32 crc)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  scalars = {}
  files = sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")))
  for path in files:
    data = pathlib.Path(path).read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack_from("<Q", data, pos)
      pos += 12
      event = event_pb2.Event.FromString(data[pos:pos + length])
      pos += length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


def event_files(workdir):
  return glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))


def restore_numpy(workdir, step, item="state"):
  """A checkpointed item as a pytree of numpy arrays, on any device count (no target mesh)."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(workdir).absolute() / "checkpoints" / str(step) / item
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(path)
  tree = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata.tree
  args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(path, restore_args=args)


def flat_with_paths(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def finished_steps(workdir):
  """Checkpoint steps whose save completed (orbax renames a step's temporary folder last)."""
  directory = pathlib.Path(workdir) / "checkpoints"
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def data_states(workdir, step):
  """Every process's data iterator state stored with a checkpoint, in process order (one JSON
  file per process, train/checkpoints.py)."""
  folder = pathlib.Path(workdir) / "checkpoints" / str(step) / "data_iterator"
  files = sorted(folder.glob("process_*-of-*.json"),
                 key=lambda p: int(p.name.split("_")[1].split("-")[0]))
  if not files:
    raise AssertionError(f"no data iterator state in {folder}")
  return [json.loads(p.read_text()) for p in files]


class OutputWatcher:
  """Collects a child's merged stdout/stderr lines on a thread; `wait_for(regex)` blocks until
  a line matches (so a test can act at a chosen point of a run)."""

  def __init__(self, process):
    import queue  # pylint: disable=g-import-not-at-top
    import threading  # pylint: disable=g-import-not-at-top
    self.process = process
    self.lines = []
    self._queue = queue.Queue()
    self._thread = threading.Thread(target=self._read, daemon=True)
    self._thread.start()

  def _read(self):
    for line in self.process.stdout:
      self._queue.put(line.rstrip("\n"))
    self._queue.put(None)

  def wait_for(self, pattern, timeout=600):
    """The first new line matching `pattern` (re.search); AssertionError on exit or timeout."""
    import queue  # pylint: disable=g-import-not-at-top
    import re  # pylint: disable=g-import-not-at-top
    import time  # pylint: disable=g-import-not-at-top
    deadline = time.monotonic() + timeout
    while True:
      try:
        line = self._queue.get(timeout=max(deadline - time.monotonic(), 0.01))
      except queue.Empty:
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s; last output:\n"
                             + "\n".join(self.lines[-30:])) from None
      if line is None:
        raise AssertionError(f"the process ended before printing {pattern!r}; last output:\n"
                             + "\n".join(self.lines[-30:]))
      self.lines.append(line)
      match = re.search(pattern, line)
      if match:
        return match

  def finish(self, timeout=600):
    """Waits for the process; returns (exit status, all output lines)."""
    status = self.process.wait(timeout=timeout)
    self._thread.join(timeout=60)
    while not self._queue.empty():
      line = self._queue.get()
      if line is not None:
        self.lines.append(line)
    return status, self.lines


def start(command, env):
  """Starts a child with merged, line-buffered text output and an OutputWatcher on it."""
  process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, bufsize=1)
  return OutputWatcher(process)


def child_pids(pid):
  """Direct children of a process (Linux /proc)."""
  path = pathlib.Path(f"/proc/{pid}/task/{pid}/children")
  return [int(p) for p in path.read_text().split()] if path.exists() else []


def process_env(pid):
  raw = pathlib.Path(f"/proc/{pid}/environ").read_bytes()
  return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
