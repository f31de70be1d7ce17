#!/usr/bin/env bash
# Local multi-process run on CPU (debugging multi-host code paths, used like the tests do):
# N processes x D virtual CPU devices each, jax.distributed over localhost, gloo collectives.
#
#   launch/local_cpu.sh [NUM_PROCESSES] [DEVICES_PER_PROCESS] -- main.py flags...
#   launch/local_cpu.sh 2 2 -- --config=configs/tiny.py --workdir=/tmp/tiny_mp
#
# Logs: <workdir-less> /tmp/local_cpu_logs/process_<i>.log; process 0 is also streamed.
set -euo pipefail

NUM_PROCESSES="${1:-2}"
DEVICES_PER_PROCESS="${2:-2}"
shift 2 || true
[[ "${1:-}" == "--" ]] && shift
PORT="${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("localhost",0)); print(s.getsockname()[1])')}"
LOG_DIR="${LOG_DIR:-/tmp/local_cpu_logs}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "${LOG_DIR}"

pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}" \
  JAX_PLATFORMS=cpu \
  python3 "${REPO}/main.py" "$@" \
    --coordinator_address="localhost:${PORT}" \
    --num_processes="${NUM_PROCESSES}" --process_id="${i}" \
    >"${LOG_DIR}/process_${i}.log" 2>&1 &
  pids+=($!)
done
# Forward Ctrl-C / SIGTERM to every process (they save a checkpoint and exit 0).
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
tail -n +1 -f "${LOG_DIR}/process_0.log" &
tail_pid=$!
status=0
for pid in "${pids[@]}"; do wait "${pid}" || status=$?; done
kill "${tail_pid}" 2>/dev/null || true
exit "${status}"
