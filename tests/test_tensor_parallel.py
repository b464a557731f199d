"""Tensor parallelism from the models' logical axes, on 8 simulated CPU devices.

One subprocess (tests/scripts/tensor_parallel.py) trains a tiny GPT and a tiny tokenizer on 1
device and on a (data 2, fsdp 2, tensor 2) mesh, compiles the GPT step at 1 and 2 layers and
samples on both; the tests below read its results.
"""
import fcntl
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT

# Sums over 2 or 4 shards run in another order than on one device: float32 rounding only.
LOSS_RTOL = 1e-5


def run_once_across_workers(tmp_path_factory, name, compute):
  """compute() once per pytest run: under pytest-xdist every worker that gets one of this module's
  tests would run the fixture again (minutes each), so the first one writes its result to the
  run's shared temporary folder and the others, waiting on a lock, read it (the pattern of
  pytest-xdist's documentation, with fcntl instead of the filelock package)."""
  base = tmp_path_factory.getbasetemp()
  shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  path = shared / f"{name}.json"
  with open(f"{path}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not path.is_file():
      path.write_text(json.dumps(compute()))
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  return run_once_across_workers(tmp_path_factory, "tensor_parallel_results", run_script)


def run_script():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT), JAX_ENABLE_COMPILATION_CACHE="0")
  out = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "scripts" / "tensor_parallel.py"),
                        str(REPO_ROOT)], env=env, capture_output=True, text=True, timeout=900,
                       check=False)
  assert out.returncode == 0, out.stderr[-4000:]
  line = [l for l in out.stdout.splitlines() if l.startswith("RESULTS ")][-1]
  return json.loads(line[len("RESULTS "):])


def per_layer(gpt):
  two, one = gpt["collectives_2_layers"], gpt["collectives_1_layer"]
  return {k: two.get(k, 0) - one.get(k, 0) for k in set(two) | set(one)}


def test_gpt_losses_match_one_device(results):
  gpt = results["gpt"]
  assert len(gpt["losses_1"]) == 3
  np.testing.assert_allclose(gpt["losses_8"], gpt["losses_1"], rtol=LOSS_RTOL)
  assert len(set(gpt["losses_1"])) == 3   # the steps change the params


def test_gpt_step_has_megatron_collectives_per_layer(results):
  layer = {k: v for k, v in per_layer(results["gpt"]).items() if v}
  assert layer == {
      # Megatron: after wo and w2 in the forward; the inputs' gradients of wqkv and w1/w3 in
      # the backward.
      "all-reduce|tensor": 4,
      # FSDP: wo, w1, w3, w2 gathered for the forward; w1, w3, w2 again for the backward.
      "all-gather|fsdp": 7,
      # The fused official wqkv kernel (replicated over tensor, models/gpt.py QKVProjection):
      # gathered for the forward, its gradient gathered back; XLA runs both over all devices.
      "all-gather|dataxfsdpxtensor": 2,
  }
  assert results["gpt"]["remats"] == 0


def test_tokenizer_losses_match_one_device(results):
  tok = results["tokenizer"]
  assert len(tok["losses_1"]) == 2
  for a, b in zip(tok["losses_1"], tok["losses_8"]):
    assert set(a) == {"loss", "mse_loss", "disc_loss"}
    for key in a:
      np.testing.assert_allclose(b[key], a[key], rtol=LOSS_RTOL, err_msg=key)
  assert tok["remats"] == 0
  assert tok["collectives"].get("all-reduce|tensor", 0) > 0   # it really runs tensor-parallel


def test_sampler_under_tensor_parallel_mesh_gives_the_same_codes(results):
  s = results["sampler"]
  assert np.array(s["codes_1"]).shape == (8, 32)
  assert s["codes_8"] == s["codes_1"]
  assert s["collectives"].get("all-reduce|tensor", 0) > 0
