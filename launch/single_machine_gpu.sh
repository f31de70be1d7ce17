#!/usr/bin/env bash
# One machine, several GPUs: a single process drives all local GPUs. No cluster is detected
# there, so main.py logs "Single process" and does not call jax.distributed.
#
#   launch/single_machine_gpu.sh [--dry-run] CONFIG WORKDIR [--config.x=y ...]
#   launch/single_machine_gpu.sh configs/cifar10_ddpm.py runs/cifar10
#
# --dry-run prints the command and runs nothing. Pick GPUs with CUDA_VISIBLE_DEVICES=0,1,2,3.
# training.batch_size is the global batch and must be divisible by the number of GPUs
# (x training.grad_accum_steps). SIGTERM / Ctrl-C: the run saves a checkpoint and exits 0;
# the same command resumes it. Environment: PYTHON (default python).
set -euo pipefail
DRY_RUN="${DRY_RUN:-0}"
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
CONFIG="${1:?usage: $0 [--dry-run] CONFIG WORKDIR [main.py flags]}"
WORKDIR="${2:?usage: $0 [--dry-run] CONFIG WORKDIR [main.py flags]}"
shift 2
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
COMMAND=("${PYTHON:-python}" "$(cd "$(dirname "$0")/.." && pwd)/main.py"
         --config="${CONFIG}" --workdir="${WORKDIR}" "$@")
if [[ "${DRY_RUN}" == 1 ]]; then
  echo "XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION} CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-<all>}"
  printf '%q ' "${COMMAND[@]}"; echo
  exit 0
fi
exec "${COMMAND[@]}"
