#!/usr/bin/env bash
# Local multi-process run on CPU (debugging multi-host code paths, used like the tests do):
# N processes x D virtual CPU devices each. Each process gets --coordinator_address,
# --num_processes and --process_id, so main.py initialises jax.distributed over localhost
# (gloo collectives) without any cluster to detect.
#
#   launch/local_cpu.sh [--dry-run] NUM_PROCESSES DEVICES_PER_PROCESS -- main.py flags...
#   launch/local_cpu.sh 2 2 -- --config=configs/tiny.py --workdir=/tmp/tiny_mp
#
# --dry-run prints the command of every process and starts none. Logs:
# $LOG_DIR/process_<i>.log (default /tmp/local_cpu_logs); process 0's is also streamed.
# Ctrl-C / SIGTERM reaches every process: each saves a checkpoint and exits 0.
# Environment: PORT (coordinator port, default a free one), PYTHON (default python3).
set -euo pipefail

DRY_RUN="${DRY_RUN:-0}"
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
NUM_PROCESSES="${1:-2}"
DEVICES_PER_PROCESS="${2:-2}"
shift "$(( $# < 2 ? $# : 2 ))"
if [[ "${1:-}" == "--" ]]; then shift; fi
if ! [[ "${NUM_PROCESSES}" =~ ^[1-9][0-9]*$ && "${DEVICES_PER_PROCESS}" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 [--dry-run] NUM_PROCESSES DEVICES_PER_PROCESS -- main.py flags" \
       "(got NUM_PROCESSES='${NUM_PROCESSES}', DEVICES_PER_PROCESS='${DEVICES_PER_PROCESS}')" >&2
  exit 2
fi
PYTHON="${PYTHON:-python3}"
LOG_DIR="${LOG_DIR:-/tmp/local_cpu_logs}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
if [[ "${DRY_RUN}" == 1 ]]; then
  PORT="${PORT:-<free-port>}"
else
  PORT="${PORT:-$("${PYTHON}" -c 'import socket; s=socket.socket(); s.bind(("localhost",0)); print(s.getsockname()[1])')}"
  mkdir -p "${LOG_DIR}"
fi

process_command() {  # The command line of process $1.
  COMMAND=(env "XLA_FLAGS=--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}"
           JAX_PLATFORMS=cpu "${PYTHON}" "${REPO}/main.py" "$@"
           --coordinator_address="localhost:${PORT}"
           --num_processes="${NUM_PROCESSES}" --process_id="${i}")
}

pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  process_command "$@"
  if [[ "${DRY_RUN}" == 1 ]]; then
    printf '%q ' "${COMMAND[@]}"; echo "> ${LOG_DIR}/process_${i}.log 2>&1 &"
    continue
  fi
  "${COMMAND[@]}" >"${LOG_DIR}/process_${i}.log" 2>&1 &
  pids+=($!)
done
if [[ "${DRY_RUN}" == 1 ]]; then exit 0; fi
# Forward Ctrl-C / SIGTERM to every process (they save a checkpoint and exit 0).
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
tail -n +1 -f "${LOG_DIR}/process_0.log" &
tail_pid=$!
status=0
for pid in "${pids[@]}"; do wait "${pid}" || status=$?; done
kill "${tail_pid}" 2>/dev/null || true
exit "${status}"
