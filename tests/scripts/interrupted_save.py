"""Saves a small checkpoint at step 2, then starts a large save at step 4 for the caller to kill.

usage: python interrupted_save.py WORKDIR

Prints "SAVED 2" once step 2 is on disk and "SAVING 4" just before the large save; the test
SIGKILLs the process while step 4 is being written (a preemption without a grace period).
"""
import sys

import jax.numpy as jnp
import numpy as np

from detailflow_jax.train import checkpoints

LARGE_LEAVES, LARGE_LEAF_ELEMENTS = 32, 4 * 1024 * 1024   # 512 MiB of float32


def small_state(step):
  return {"w": jnp.full((4, 8), float(step)), "step": jnp.asarray(step, jnp.int32)}


def main():
  workdir = sys.argv[1]
  checkpointer = checkpoints.Checkpointer(workdir, keep=3)
  checkpointer.save(2, small_state(2), {"next_index": 2})
  checkpointer.wait()
  print("SAVED 2", flush=True)
  rng = np.random.default_rng(0)
  large = {"w": jnp.full((4, 8), 4.0), "step": jnp.asarray(4, jnp.int32),
           "extra": [jnp.asarray(rng.standard_normal(LARGE_LEAF_ELEMENTS, np.float32))
                     for _ in range(LARGE_LEAVES)]}
  print("SAVING 4", flush=True)
  checkpointer.save(4, large, {"next_index": 4})
  checkpointer.wait()
  print("SAVED 4", flush=True)


if __name__ == "__main__":
  main()
