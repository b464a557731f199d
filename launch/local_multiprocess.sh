#!/usr/bin/env bash
# Runs one command as an N-process JAX job on this machine, each process with M CPU devices:
# a rehearsal of a multi-host run (TPU pod, GPU cluster) with no accelerator.
#
#   launch/local_multiprocess.sh N M COMMAND [ARGS...]
#   launch/local_multiprocess.sh 2 4 python -m detailflow_jax.main \
#       --config=configs/tokenizer_tiny.py:smoke --workdir=/tmp/run --config.mesh.fsdp=4
#
# Every process gets the same command and, in its environment, JAX_COORDINATOR_ADDRESS
# (localhost and a free port, or LOCAL_COORDINATOR_PORT), JAX_NUM_PROCESSES=N,
# JAX_PROCESS_ID=i (read by detailflow_jax/distributed.py), JAX_PLATFORMS=cpu and
# XLA_FLAGS=--xla_force_host_platform_device_count=M. Output goes to this terminal, or to
# $LOCAL_LOG_DIR/process_<i>.log when LOCAL_LOG_DIR is set.
#
# SIGTERM / SIGINT are forwarded to every process (the trainers save a checkpoint at the next
# step and exit 0). If one process fails, the others are stopped. The exit status is the first
# non-zero status of a process, else 0.
set -uo pipefail

if [ "$#" -lt 3 ]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS COMMAND [ARGS...]" >&2
  exit 2
fi
num_processes="$1"
devices="$2"
shift 2
for value in "$num_processes" "$devices"; do
  if ! [[ "$value" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: NUM_PROCESSES and DEVICES_PER_PROCESS must be positive integers, got '$value'" >&2
    exit 2
  fi
done

python_bin="${PYTHON:-python3}"
port="${LOCAL_COORDINATOR_PORT:-$("$python_bin" -c \
  'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
# Seconds the remaining processes get to exit on their own once one has failed.
grace="${LOCAL_STOP_GRACE:-20}"

pids=()
for ((i = 0; i < num_processes; i++)); do
  (
    export JAX_COORDINATOR_ADDRESS="localhost:${port}"
    export JAX_NUM_PROCESSES="$num_processes"
    export JAX_PROCESS_ID="$i"
    export JAX_PLATFORMS=cpu
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}"
    if [ -n "${LOCAL_LOG_DIR:-}" ]; then
      mkdir -p "$LOCAL_LOG_DIR"
      exec "$@" >"$LOCAL_LOG_DIR/process_${i}.log" 2>&1
    fi
    exec "$@"
  ) &
  pids+=("$!")
done

forward() {
  for pid in "${pids[@]}"; do kill "-$1" "$pid" 2>/dev/null; done
}
trap 'forward TERM' TERM
trap 'forward INT' INT

# Wait for every process; on the first failure stop the rest (a lone survivor would block in
# a collective until the runtime's heartbeat timeout).
status=0
killer=""
remaining=${#pids[@]}
declare -A done_pids=()
while [ "$remaining" -gt 0 ]; do
  for pid in "${pids[@]}"; do
    [ -n "${done_pids[$pid]:-}" ] && continue
    if ! kill -0 "$pid" 2>/dev/null; then
      wait "$pid"
      rc=$?
      done_pids[$pid]=1
      remaining=$((remaining - 1))
      if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
        status=$rc
        echo "[local_multiprocess] a process exited with status $rc; stopping the others" >&2
        forward TERM
        (sleep "$grace"; forward KILL) &
        killer=$!
      fi
    fi
  done
  [ "$remaining" -gt 0 ] && sleep 0.2
done
[ -n "$killer" ] && kill "$killer" 2>/dev/null
exit "$status"
