#!/usr/bin/env bash
# Runs a detailflow_jax command on every host of a Cloud TPU VM slice (v4, v5e, v5p pods).
#
#   launch/tpu_pod.sh setup  TPU_NAME ZONE            copy this checkout to every worker, install
#   launch/tpu_pod.sh run    TPU_NAME ZONE ARGS...    start `python -m detailflow_jax.main ARGS`
#                                                     on every worker (background, logged)
#   launch/tpu_pod.sh logs   TPU_NAME ZONE [WORKER]   tail a worker's log (default worker 0)
#   launch/tpu_pod.sh stop   TPU_NAME ZONE            SIGTERM every worker: checkpoint, exit 0
#
# Example (GPT-L on a v5p-64, 32 chips on 8 hosts):
#   launch/tpu_pod.sh setup my-v5p europe-west4-b
#   launch/tpu_pod.sh run my-v5p europe-west4-b --config=configs/ar_l.py \
#       --config.data.codes_dir=/mnt/shared/codes --workdir=/mnt/shared/runs/ar_l \
#       --config.mesh.fsdp=8
# Check the mesh first, on any machine: python -m detailflow_jax.compile_check
#   --config=configs/ar_l.py --devices=32 --config.mesh.fsdp=8   (docs/scaling.md)
#
# Every host runs the same command with --distributed=detect: JAX reads the worker list and
# this host's id from the TPU VM metadata, so no coordinator address is needed. The workdir and
# data must be one path that every host sees (Filestore/NFS, or a gcsfuse mount of a bucket at
# the same mount point): orbax writes each host's checkpoint shards there, and process 0 writes
# metrics and images.
#
# Environment: PROJECT (gcloud project, default: gcloud's), REMOTE_DIR (checkout folder on the
# workers, default detailflow_jax), JAX_TPU_SPEC (pip requirement for TPU jax, default
# "jax[tpu]"), GCLOUD (default gcloud).
#
# Queued resources (the usual way to get v5e/v5p capacity, and spot/preemptible slices):
#   gcloud compute tpus queued-resources create my-qr --node-id my-v5p --zone europe-west4-b \
#       --accelerator-type v5p-64 --runtime-version v2-alpha-tpuv5 [--spot]
#   gcloud compute tpus queued-resources describe my-qr --zone europe-west4-b   # until ACTIVE
# then setup/run as above with TPU_NAME=my-v5p. A spot slice is preempted with SIGTERM on every
# host: the trainers save at the next step and exit 0; run the same `run` command on the new
# slice to resume from the workdir.
#
# Multislice (several slices over the data-center network): create the queued resource with
# `--node-count N --node-prefix my-v5p` and run this script for each node name
# (my-v5p-0, my-v5p-1, ...). The runtime sets MEGASCALE_* variables and JAX sees all slices'
# devices, slice by slice. Keep the data axis across slices (mesh.data a multiple of the slice
# count) and fsdp/tensor inside a slice, so that only the data-parallel gradient reduction
# crosses the slower network; see docs/scaling.md.
set -euo pipefail

usage() {
  sed -n '2,7p' "$0" >&2
  exit 2
}
[ "$#" -ge 3 ] || usage
action="$1"
tpu="$2"
zone="$3"
shift 3

gcloud_bin="${GCLOUD:-gcloud}"
remote_dir="${REMOTE_DIR:-detailflow_jax}"
project_args=()
[ -n "${PROJECT:-}" ] && project_args=(--project "$PROJECT")

on_workers() {  # on_workers WORKER COMMAND
  "$gcloud_bin" compute tpus tpu-vm ssh "$tpu" --zone "$zone" "${project_args[@]}" \
      --worker="$1" --command="$2"
}

quote_args() {
  local quoted=""
  for arg in "$@"; do quoted+=" $(printf '%q' "$arg")"; done
  echo "$quoted"
}

case "$action" in
  setup)
    repo="$(cd "$(dirname "$0")/.." && pwd)"
    archive="$(mktemp -t detailflow_jax.XXXXXX.tar.gz)"
    # The committed tree only: no virtualenv, workdirs or caches.
    git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
    "$gcloud_bin" compute tpus tpu-vm scp "$archive" "$tpu:detailflow_jax.tar.gz" \
        --zone "$zone" "${project_args[@]}" --worker=all
    rm -f "$archive"
    on_workers all "mkdir -p $remote_dir && tar -xzf detailflow_jax.tar.gz -C $remote_dir && \
cd $remote_dir && python3 -m pip install -q --upgrade pip && \
python3 -m pip install -q -e . '${JAX_TPU_SPEC:-jax[tpu]}' && \
python3 -c 'import detailflow_jax, jax; print(\"jax\", jax.__version__)'"
    ;;
  run)
    [ "$#" -ge 1 ] || usage
    args="$(quote_args "$@")"
    # nohup + pid file: the run survives the ssh session and `stop` can signal it.
    on_workers all "cd $remote_dir && nohup python3 -m detailflow_jax.main --distributed=detect \
$args > \$HOME/detailflow_train.log 2>&1 & echo \$! > \$HOME/detailflow_train.pid"
    echo "started on every worker of $tpu; follow with: $0 logs $tpu $zone"
    ;;
  logs)
    on_workers "${1:-0}" "tail -n 200 -f \$HOME/detailflow_train.log"
    ;;
  stop)
    # SIGTERM as a preemption would send it: every host saves at the same step and exits 0.
    on_workers all "kill -TERM \$(cat \$HOME/detailflow_train.pid) 2>/dev/null || true"
    ;;
  *)
    usage
    ;;
esac
