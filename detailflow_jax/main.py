"""Entry point: python -m detailflow_jax.main --config=configs/<name>.py --workdir=DIR.

The config's `job` field names what runs; every job is a function (config, workdir) -> None.
SIGTERM stops any job at its next safe point with its work saved and exit status 0; the same
command resumes (preemption.py).
The console shows this package's lines and every warning, and library INFO (orbax, jax) only
with --verbosity=0; WORKDIR/logs/<job>.log gets every record, each logged step's full metrics too.
"""
import importlib
import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from detailflow_jax import compilation_cache
from detailflow_jax.config import files
from detailflow_jax import distributed
from detailflow_jax import host_devices
from detailflow_jax import host_memory
from detailflow_jax import preemption

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
    "study": "detailflow_jax.jobs.study:run_study",
}


def resolve_job(name):
  if name not in JOBS:
    raise ValueError(f"config.job={name!r} is not a job. Valid jobs: {', '.join(sorted(JOBS))}")
  module_name, function_name = JOBS[name].split(":")
  return getattr(importlib.import_module(module_name), function_name)


class ConsoleFilter(std_logging.Filter):
  """What the console shows of the log: warnings and errors from anyone, this package's own INFO
  lines, and library INFO (orbax, jax, ...) only when --verbosity is given. Records logged with
  metrics_writer.FILE_ONLY (every log step's full metrics) go to the log file only."""

  def __init__(self, show_library_info):
    super().__init__()
    self.show_library_info = show_library_info

  def filter(self, record):
    if getattr(record, "file_only", False):
      return False
    if record.levelno >= std_logging.WARNING or self.show_library_info:
      return True
    return record.pathname.startswith(_PACKAGE_DIR)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class _FileFormatter(std_logging.Formatter):
  """absl's prefix (level, time, thread, file:line) on every line. The console shows INFO lines
  without it unless --verbosity or --showprefixforinfo is given."""

  def format(self, record):
    return logging.get_absl_log_prefix(record) + super().format(record)


def quiet_console():
  verbose = flags.FLAGS["verbosity"].present > 0
  if not verbose:
    flags.FLAGS.set_default("showprefixforinfo", False)
  logging.get_absl_handler().addFilter(ConsoleFilter(show_library_info=verbose))


def log_to_file(workdir, job_name):
  """Every record at the --verbosity level (INFO unless given) into WORKDIR/logs/<job>.log
  (<job>.process_<i>.log when there are several processes), appended across runs."""
  import jax  # pylint: disable=g-import-not-at-top
  suffix = f".process_{jax.process_index()}" if jax.process_count() > 1 else ""
  log_dir = os.path.join(workdir, "logs")
  os.makedirs(log_dir, exist_ok=True)
  handler = std_logging.FileHandler(os.path.join(log_dir, f"{job_name}{suffix}.log"))
  handler.setFormatter(_FileFormatter())
  std_logging.getLogger().addHandler(handler)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  quiet_console()
  config = _CONFIG.value
  # Before anything starts JAX's backends: the CPU client's device count is fixed at its start.
  host_devices.configure(config.get("cpu_devices", 1))
  distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                         _PROCESS_ID.value, _LOCAL_DEVICE_IDS.value)
  job = resolve_job(config.job)
  compilation_cache.enable()
  log_to_file(_WORKDIR.value, config.job)
  logging.info("job %s, workdir %s", config.job, _WORKDIR.value)
  # Every job's config as text in WORKDIR/tensorboard, beside the scalars and images it writes.
  from detailflow_jax.train import metrics_writer  # pylint: disable=g-import-not-at-top
  metrics_writer.write_config(_WORKDIR.value, config)
  # SIGTERM from here on stops the job at its next safe point with its work saved, and the
  # process exits 0; the same command resumes (preemption.py).
  with preemption.sigterm_caught():
    try:
      job(config, _WORKDIR.value)
    except preemption.Preempted as stopped:
      print(stopped, flush=True)


def run():
  # First: glibc reads its tunables only when a process starts (host_memory.py).
  host_memory.restart_with_hugepages()
  try:
    files.check_overrides(sys.argv)
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  app.run(main)


if __name__ == "__main__":
  run()
