"""Entry point: python -m detailflow_jax.main --config=configs/<name>.py --workdir=DIR.

The config's `job` field names what runs; every job is a function (config, workdir) -> None.
"""
import importlib
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from detailflow_jax import compilation_cache
from detailflow_jax import config_keys
from detailflow_jax import distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
flags.mark_flags_as_required(["config", "workdir"])
# Multi-process jobs (see distributed.py): explicit values, else JAX_* / SLURM_* / TPU variables.
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", distributed.MODES,
                                 "auto: from the flags below or the environment; detect: JAX's "
                                 "cluster detection (TPU pods); off: one process.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes).")
_LOCAL_DEVICE_IDS = flags.DEFINE_list("local_device_ids", None, "Devices this process uses.")

# job name -> "module:function", imported only when that job runs.
JOBS = {
    "train_tokenizer": "detailflow_jax.train.tokenizer_trainer:train_and_evaluate",
    "extract_codes": "detailflow_jax.jobs.extract_codes:extract_codes",
    "train_ar": "detailflow_jax.train.ar_trainer:train_and_evaluate",
    "sample": "detailflow_jax.jobs.sample:sample_job",
    "eval_tokenizer": "detailflow_jax.jobs.eval_tokenizer:evaluate_tokenizer",
    "eval_generator": "detailflow_jax.jobs.eval_generator:evaluate_generator",
    "eval_fid_reference": "detailflow_jax.jobs.eval_fid_reference:evaluate_fid_reference",
    "pipeline": "detailflow_jax.jobs.pipeline:run_pipeline",
}


def resolve_job(name):
  if name not in JOBS:
    raise ValueError(f"config.job={name!r} is not a job. Valid jobs: {', '.join(sorted(JOBS))}")
  module_name, function_name = JOBS[name].split(":")
  return getattr(importlib.import_module(module_name), function_name)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                         _PROCESS_ID.value, _LOCAL_DEVICE_IDS.value)
  config = _CONFIG.value
  job = resolve_job(config.job)
  compilation_cache.enable()
  logging.info("job %s, workdir %s", config.job, _WORKDIR.value)
  job(config, _WORKDIR.value)


def run():
  try:
    config_keys.check_overrides(sys.argv)
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  app.run(main)


if __name__ == "__main__":
  run()
