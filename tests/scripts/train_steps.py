"""Runs the tokenizer trainer on a config and prints every logged set of scalars as it happens.

usage: python train_steps.py CONFIG WORKDIR [--seconds_per_step=S] [--config.key=value ...]

Each logged step prints one line `METRICS {json}` (flushed), so a test can follow progress and
kill the process at a chosen point. --seconds_per_step sleeps after each logged step: it makes
a smoke run slow enough to be interrupted between two checkpoints. DETAILFLOW_TEST_CACHE names
a persistent compilation cache folder shared by the runs of one test (optional).
"""
import json
import os
import sys
import time

from absl import flags

from detailflow_jax.config import files
from detailflow_jax.train import tokenizer_trainer


def apply_override(config, dotted, value):
  *parents, leaf = dotted.split(".")
  section = config
  for name in parents:
    section = section[name]
  current = section[leaf]
  section[leaf] = type(current)(value) if not isinstance(current, bool) else value == "True"


def main(argv):
  config_path, workdir = argv[1], argv[2]
  seconds_per_step = 0.0
  config = files.load_config_file(config_path)
  for arg in argv[3:]:
    key, _, value = arg.partition("=")
    if key == "--seconds_per_step":
      seconds_per_step = float(value)
    elif key.startswith("--config."):
      apply_override(config, key[len("--config."):], value)
    else:
      raise SystemExit(f"unknown argument {arg}")
  cache = os.environ.get("DETAILFLOW_TEST_CACHE")
  if cache:
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  flags.FLAGS.mark_as_parsed()

  def report(scalars):
    print("METRICS " + json.dumps(scalars), flush=True)
    time.sleep(seconds_per_step)

  tokenizer_trainer.train_and_evaluate(config, workdir, on_metrics=report)
  print("FINISHED", flush=True)


if __name__ == "__main__":
  main(sys.argv)
