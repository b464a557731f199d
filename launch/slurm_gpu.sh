#!/usr/bin/env bash
# A SLURM batch script for GPU clusters: one JAX process per GPU (default) or per host.
#
#   sbatch --nodes=2 launch/slurm_gpu.sh --config=configs/ar_l.py \
#       --config.data.codes_dir=/shared/codes --workdir=/shared/runs/ar_l --config.mesh.fsdp=8
#   PROCESS_PER=host sbatch --nodes=2 --ntasks-per-node=1 launch/slurm_gpu.sh ...
#
# srun starts the same command in every task; detailflow_jax/distributed.py reads SLURM_NTASKS,
# SLURM_PROCID, SLURM_LOCALID and the step's node list (coordinator: the first node, port from
# the job id), and with one task per GPU gives each process the GPU of its node-local rank. The
# workdir and data must be on a filesystem every node sees (orbax writes each process's
# checkpoint shards there; process 0 writes metrics and images).
#
# Stopping and resuming: SLURM sends SIGTERM to every task on preemption, on `scancel` and
# (with --signal below) 5 minutes before the time limit. The trainers save a checkpoint at the
# next step boundary and exit 0. The job is then requeued (--requeue; preempted jobs are
# requeued by SLURM itself) and the same command resumes from the workdir. Check the mesh
# before queueing: python -m detailflow_jax.compile_check --config=... --devices=16 ...
#
# Environment: PROCESS_PER (gpu | host, default gpu), PYTHON (default python3; activate the
# virtualenv before sbatch, SLURM passes the environment on).
#
#SBATCH --job-name=detailflow
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=detailflow-%j.out
set -uo pipefail

if [ "$#" -lt 1 ]; then
  echo "usage: sbatch [--nodes=N] $0 --config=CONFIG --workdir=DIR [--config.x=y ...]" >&2
  exit 2
fi
python_bin="${PYTHON:-python3}"
process_per="${PROCESS_PER:-gpu}"
case "$process_per" in
  gpu) tasks_per_node="${SLURM_GPUS_ON_NODE:-8}" ;;
  host) tasks_per_node=1 ;;
  *) echo "error: PROCESS_PER=$process_per must be gpu or host" >&2; exit 2 ;;
esac

echo "[slurm_gpu] job ${SLURM_JOB_ID:-?}: ${SLURM_JOB_NUM_NODES:-1} nodes x $tasks_per_node" \
     "processes (one per $process_per), restart count ${SLURM_RESTART_COUNT:-0}"
# --kill-on-bad-exit: one failed process ends the step instead of leaving the others blocked
# in a collective until the distributed runtime's heartbeat timeout.
srun --kill-on-bad-exit=1 --ntasks-per-node="$tasks_per_node" \
    "$python_bin" -m detailflow_jax.main "$@"
status=$?

# A time-limit SIGTERM leaves a checkpoint and exit 0 before the run is done: queue the job
# again. (A preempted job is requeued by SLURM; a finished run has nothing left to train and
# its next start would exit at once, so requeueing is only done when the log says it stopped.)
log="detailflow-${SLURM_JOB_ID:-0}.out"
if [ "$status" -eq 0 ] && [ -f "$log" ] && tail -n 50 "$log" | grep -q "SIGTERM: saved step"; then
  echo "[slurm_gpu] stopped by SIGTERM with a checkpoint; requeueing job ${SLURM_JOB_ID}"
  scontrol requeue "${SLURM_JOB_ID}"
fi
exit "$status"
