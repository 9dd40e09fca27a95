#!/usr/bin/env bash
# N JAX processes on this machine, talking over loopback: the multi-host code path (jax.distributed, per-process
# data shards, Orbax multi-process checkpoints) without a cluster. Each process sees D simulated CPU devices.
#
#   launch/local_multiprocess.sh 2 4 -- python -m ttm_jax.main --config=configs/stage2.py --workdir=/tmp/ttm2
#
# Process 0 prints to the console; process i>0 logs to <logdir>/process_<i>.log (LOGDIR, default ./logs).
# Ctrl-C / SIGTERM is forwarded to every process: each checkpoints at its current step and exits, and running the same
# command again resumes.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS -- COMMAND..." >&2
  exit 2
fi
N=$1
D=$2
shift 2
[[ "${1:-}" == "--" ]] && shift
LOGDIR=${LOGDIR:-logs}
mkdir -p "$LOGDIR"
PORT=${JAX_PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

pids=()
for ((i = 0; i < N; i++)); do
  vars=(JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=${D} ${XLA_FLAGS:-}"
        "JAX_COORDINATOR_ADDRESS=127.0.0.1:${PORT}" "JAX_NUM_PROCESSES=${N}" "JAX_PROCESS_ID=${i}")
  if [[ $i == 0 ]]; then
    env "${vars[@]}" "$@" &
  else
    env "${vars[@]}" "$@" > "$LOGDIR/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done

forward() { kill -TERM "${pids[@]}" 2>/dev/null || true; }
trap forward INT TERM

status=0
for p in "${pids[@]}"; do
  wait "$p" || status=$?
done
exit "$status"
