"""host_devices.configure (the config field cpu_devices) and the configs that set it."""
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from detailflow_jax import host_devices
from detailflow_jax.config.files import load_config_file

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("bad", [0, -2, 2.0, "2", True])
def test_bad_cpu_devices_is_refused_by_name(bad):
  with pytest.raises(ValueError, match="cpu_devices"):
    host_devices.configure(bad)


def test_one_device_is_a_no_op_after_the_backend_started():
  jax.devices()
  host_devices.configure(1)
  host_devices.configure(None)


def test_two_devices_after_the_backend_started_is_a_clear_error(monkeypatch):
  jax.devices()
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  with pytest.raises(RuntimeError, match="cpu_devices=2 must be set before JAX starts"):
    host_devices.configure(2)


def _devices_in_fresh_process(count, xla_flags=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  if xla_flags:
    env["XLA_FLAGS"] = xla_flags
  code = ("import jax; from detailflow_jax import host_devices; "
          f"host_devices.configure({count}); print(len(jax.devices()))")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True, cwd=REPO)
  return int(out.stdout.strip().splitlines()[-1])


def test_configure_splits_the_cpu_and_leaves_a_forced_count_alone():
  assert _devices_in_fresh_process(2) == 2
  assert _devices_in_fresh_process(
      2, xla_flags=f"--{host_devices.FORCED_COUNT_FLAG}=3") == 3


def test_every_batch_of_the_default_run_splits_over_its_cpu_devices():
  """The pipeline runs every stage on config.cpu_devices devices; each stage's batch must split
  evenly (a batch of 25 would fail only at that stage, minutes into the run)."""
  config = load_config_file(str(REPO / "configs" / "default.py"))
  n = config.cpu_devices
  assert n == 2
  assert "cpu_devices" not in config.tokenizer_run and "cpu_devices" not in config.ar_run
  batches = {
      "tokenizer_run.data.batch_size": config.tokenizer_run.data.batch_size,
      "ar_run.data.batch_size": config.ar_run.data.batch_size,
      "ar_run.extract.batch_size": config.ar_run.extract.batch_size,
      "tokenizer_eval.batch_size": config.tokenizer_eval.batch_size,
      "sample.batch_size": config.sample.batch_size,
  }
  assert {k: v % n for k, v in batches.items()} == {k: 0 for k in batches}
