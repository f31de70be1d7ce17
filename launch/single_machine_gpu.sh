#!/usr/bin/env bash
# One machine, several GPUs: a single process drives all local GPUs (no jax.distributed).
#
#   launch/single_machine_gpu.sh configs/cifar10_ddpm.py runs/cifar10 [--config.x=y ...]
#
# Pick GPUs with CUDA_VISIBLE_DEVICES=0,1,2,3. training.batch_size is the global batch and
# must be divisible by the number of GPUs (x training.grad_accum_steps).
set -euo pipefail
CONFIG="${1:?config}"
WORKDIR="${2:?workdir}"
shift 2
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
exec python "$(dirname "$0")/../main.py" --config="${CONFIG}" --workdir="${WORKDIR}" "$@"
