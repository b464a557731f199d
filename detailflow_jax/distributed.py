"""Multi-process start-up: the part `jax.distributed.initialize()` does not decide itself.

Called with no arguments, `jax.distributed.initialize()` finds the processes of a job on its
own: Cloud TPU (VM metadata, multislice), SLURM (coordinator on the step's first node, port
from the job id, process id, one GPU per node-local task), Open MPI and Kubernetes; it also
reads JAX_COORDINATOR_ADDRESS and JAX_LOCAL_DEVICE_IDS. What is left here:

  1. whether to call it at all: a single process (a laptop, one GPU host, a TPU VM, a one-task
     SLURM shell) must not, as JAX would fail looking for a coordinator;
  2. explicit settings JAX does not read, checked with clear errors: the --coordinator_address
     / --num_processes / --process_id [--local_device_ids] flags of main.py, else the variables
     JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (what
     launch/local_multiprocess.sh sets).

  mode="auto" (default): explicit settings, else a multi-process cluster announced in the
    environment (SLURM_NTASKS > 1, several TPU hosts or slices, OMPI_COMM_WORLD_SIZE > 1),
    which JAX then detects; else a single process.
  mode="detect": always let JAX detect (TPU pod slices, whose VMs announce their workers only
    through the metadata server; launch/tpu_pod.sh passes it).
  mode="off": never initialise.

After it, jax.process_index() / jax.process_count() / jax.devices() describe the whole job;
the data pipeline shards by process and orbax writes each process's checkpoint shards.
"""
import dataclasses
import os
from typing import Mapping, Optional, Sequence, Tuple

from absl import logging

MODES = ("auto", "detect", "off")
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JAX_LOCAL_DEVICE_IDS"


@dataclasses.dataclass(frozen=True)
class Plan:
  """What `initialize` does. source: single | flags | env | slurm | tpu | mpi | detect | off
  (slurm, tpu, mpi: the cluster JAX will detect). `call_initialize` is False for a single
  process; None fields are left to JAX to detect."""
  source: str
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  local_device_ids: Optional[Tuple[int, ...]] = None

  @property
  def call_initialize(self):
    return self.source not in ("single", "off")

  def describe(self):
    if not self.call_initialize:
      return f"single process ({self.source})"
    parts = [f"source={self.source}"]
    for name in ("coordinator_address", "num_processes", "process_id", "local_device_ids"):
      value = getattr(self, name)
      if value is not None:
        parts.append(f"{name}={value}")
    return ", ".join(parts)


def _as_int(value, name, minimum):
  try:
    number = int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name}={value!r} is not an integer") from None
  if number < minimum:
    raise ValueError(f"{name}={number} must be >= {minimum}")
  return number


def parse_device_ids(value, name="local_device_ids"):
  """'0,1' / [0, 1] / None -> (0, 1) / None."""
  if value is None or value == "" or value == []:
    return None
  items = value.split(",") if isinstance(value, str) else list(value)
  return tuple(_as_int(v, name, 0) for v in items)


def _tpu_hosts(env):
  names = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
  return [n for n in names.split(",") if n.strip()]


def _count(env, name):
  try:
    return int(env.get(name, "1") or 1)
  except ValueError:
    return 1


def announced_cluster(env):
  """The multi-process cluster the environment announces (slurm | tpu | mpi), or None."""
  if "SLURM_JOB_ID" in env and _count(env, "SLURM_NTASKS") > 1:
    return "slurm"
  if len(_tpu_hosts(env)) > 1 or _count(env, "MEGASCALE_NUM_SLICES") > 1:
    return "tpu"
  if _count(env, "OMPI_COMM_WORLD_SIZE") > 1:
    return "mpi"
  return None


def _explicit_plan(source, coordinator_address, num_processes, process_id, local_device_ids):
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  missing = [k for k, v in given.items() if v in (None, "")]
  where = "flags --" if source == "flags" else "environment variables "
  if missing:
    names = {"coordinator_address": ENV_COORDINATOR, "num_processes": ENV_NUM_PROCESSES,
             "process_id": ENV_PROCESS_ID}
    shown = [f"--{k}" if source == "flags" else names[k] for k in missing]
    raise ValueError(
        f"multi-process start from {where.strip()}: {', '.join(shown)} missing. Give all three "
        "of coordinator address (host:port of process 0), number of processes and this "
        "process's id, or none of them for a single process.")
  if ":" not in str(coordinator_address):
    raise ValueError(f"coordinator_address={coordinator_address!r} must be host:port, e.g. "
                     "localhost:12355 or the first host's name with a free port")
  count = _as_int(num_processes, "num_processes", 1)
  index = _as_int(process_id, "process_id", 0)
  if index >= count:
    raise ValueError(f"process_id={index} must be in [0, num_processes={count})")
  if count == 1:
    return Plan("single")
  return Plan(source, str(coordinator_address), count, index, parse_device_ids(local_device_ids))


def resolve(mode="auto", coordinator_address=None, num_processes=None, process_id=None,
            local_device_ids=None, env: Optional[Mapping[str, str]] = None) -> Plan:
  """The Plan for these arguments and environment (os.environ by default); see module doc."""
  env = os.environ if env is None else env
  if mode not in MODES:
    raise ValueError(f"distributed mode {mode!r} is not one of {MODES}")
  if mode == "off":
    return Plan("off")
  if mode == "detect":
    return Plan("detect", coordinator_address or None,
                None if num_processes is None else _as_int(num_processes, "num_processes", 1),
                None if process_id is None else _as_int(process_id, "process_id", 0),
                parse_device_ids(local_device_ids))
  if any(v not in (None, "") for v in (coordinator_address, num_processes, process_id)):
    return _explicit_plan("flags", coordinator_address, num_processes, process_id,
                          local_device_ids)
  if any(env.get(k) for k in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)):
    return _explicit_plan("env", env.get(ENV_COORDINATOR), env.get(ENV_NUM_PROCESSES),
                          env.get(ENV_PROCESS_ID),
                          local_device_ids or env.get(ENV_LOCAL_DEVICE_IDS))
  cluster = announced_cluster(env)
  if cluster:
    return Plan(cluster)  # jax.distributed.initialize() reads the rest from the environment
  return Plan("single")


def is_initialized():
  import jax  # pylint: disable=g-import-not-at-top
  return jax.distributed.is_initialized()


def initialize(mode="auto", coordinator_address=None, num_processes=None, process_id=None,
               local_device_ids: Optional[Sequence[int]] = None,
               env: Optional[Mapping[str, str]] = None) -> Plan:
  """Resolves the Plan and starts JAX's distributed runtime when it names several processes.

  Call it before any JAX computation (it must precede backend start-up). Calling it again in
  an initialised process does nothing. Returns the Plan.
  """
  plan = resolve(mode, coordinator_address, num_processes, process_id, local_device_ids, env)
  if not plan.call_initialize:
    return plan
  import jax  # pylint: disable=g-import-not-at-top
  if jax.distributed.is_initialized():
    return plan
  logging.info("starting the distributed runtime: %s", plan.describe())
  jax.distributed.initialize(
      coordinator_address=plan.coordinator_address, num_processes=plan.num_processes,
      process_id=plan.process_id,
      local_device_ids=None if plan.local_device_ids is None else list(plan.local_device_ids))
  logging.info("process %d of %d; %d local and %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return plan
