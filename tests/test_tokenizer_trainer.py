"""Tokenizer training: resume equivalence, multi-device equality, config errors."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags

from detailflow_jax.config.files import load_config_file
from detailflow_jax.train import checkpoints
from detailflow_jax.train import tokenizer_trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "tokenizer_tiny.py") + ":smoke"


def smoke_config(fake_fmnist_dir, steps):
  config = load_config_file(SMOKE)
  config.data.fashion_mnist_dir = str(fake_fmnist_dir)
  config.train.num_steps = steps
  config.train.checkpoint_every = 2
  return config


def restored_params(workdir, state_template):
  ckpt = checkpoints.Checkpointer(workdir)
  state, data = ckpt.restore(state_template)
  ckpt.close()
  return state, data


class Crash(Exception):
  pass


def crash_at(step):
  def on_metrics(metrics):
    if metrics["step"] == step:
      raise Crash(f"simulated crash at step {step}")
  return on_metrics


def test_resume_after_restart_is_bit_exact(tmp_path, fake_fmnist_dir):
  flags.FLAGS.mark_as_parsed()
  straight = tokenizer_trainer.train_and_evaluate(
      smoke_config(fake_fmnist_dir, 4), str(tmp_path / "straight"))
  # The same command crashes after the step-2 checkpoint (steps 3-4 computed, not saved) ...
  with pytest.raises(Crash):
    tokenizer_trainer.train_and_evaluate(smoke_config(fake_fmnist_dir, 4),
                                         str(tmp_path / "resumed"), on_metrics=crash_at(4))
  # ... and run again, resumes from step 2.
  logged = []
  resumed = tokenizer_trainer.train_and_evaluate(
      smoke_config(fake_fmnist_dir, 4), str(tmp_path / "resumed"), on_metrics=logged.append)
  assert [m["step"] for m in logged] == [4], "the resumed run must start after step 2"
  assert int(resumed.step) == int(straight.step) == 4
  flat_a = jax.tree_util.tree_leaves(jax.device_get(straight.params))
  flat_b = jax.tree_util.tree_leaves(jax.device_get(resumed.params))
  assert all(np.array_equal(a, b) for a, b in zip(flat_a, flat_b))
  _, data_a = restored_params(tmp_path / "straight", straight)
  _, data_b = restored_params(tmp_path / "resumed", resumed)
  assert data_a == data_b and data_a  # same data position after 4 steps


def run_losses(devices, data, fsdp, workdir, fake_dir):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  config = SMOKE
  out = subprocess.run(
      [sys.executable, str(REPO / "tests" / "scripts" / "tokenizer_losses.py"), "3",
       str(data), str(fsdp), str(workdir), config, str(fake_dir)],
      env=env, capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  line = [l for l in out.stdout.splitlines() if l.startswith("LOSSES ")][-1]
  return json.loads(line[len("LOSSES "):])


def test_eight_devices_data_fsdp_match_one_device(tmp_path, fake_fmnist_dir):
  one = run_losses(1, 1, 1, tmp_path / "one", fake_fmnist_dir)
  eight = run_losses(8, 4, 2, tmp_path / "eight", fake_fmnist_dir)
  assert len(one) == len(eight) == 3
  for a, b in zip(one, eight):
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
    np.testing.assert_allclose(b["mse_loss"], a["mse_loss"], rtol=1e-5)


def test_unknown_config_key_lists_valid_keys(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "detailflow_jax.main", f"--config={SMOKE}",
       f"--workdir={tmp_path}", "--config.train.nm_steps=3"],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode == 2
  assert "Unknown config key(s): train.nm_steps" in out.stderr
  assert "train.num_steps" in out.stderr


def test_unknown_job_is_rejected():
  from detailflow_jax import main  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="Valid jobs"):
    main.resolve_job("train_everything")
