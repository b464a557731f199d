"""Prints the per-step losses of a few tokenizer train steps as JSON (run in a subprocess so
XLA_FLAGS can set the simulated device count before JAX starts).

usage: python tokenizer_losses.py STEPS DATA FSDP WORKDIR CONFIG FASHION_MNIST_DIR
"""
import json
import sys

from absl import flags

from detailflow_jax.config.files import load_config_file
from detailflow_jax.train import tokenizer_trainer


def main():
  steps, data, fsdp, workdir, config_path, fmnist_dir = sys.argv[1:7]
  flags.FLAGS.mark_as_parsed()
  config = load_config_file(config_path)
  config.train.num_steps = int(steps)
  config.data.fashion_mnist_dir = fmnist_dir
  config.train.log_every = 1
  config.train.checkpoint_every = 1000
  config.mesh.data, config.mesh.fsdp = int(data), int(fsdp)
  losses = []
  tokenizer_trainer.train_and_evaluate(config, workdir, on_metrics=losses.append)
  print("LOSSES " + json.dumps(losses))


if __name__ == "__main__":
  main()
