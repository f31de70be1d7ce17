#!/usr/bin/env bash
# The performance issue's accelerator measures in one call, for a session lent a GPU (the
# `device` tool): cifar10_ddpm's train step in bf16 at batch 128 and DDIM-50 at batch 256, each
# line with images/s, MFU (XLA's FLOPs over the device's peak), peak device memory and compile
# time. About 5-8 minutes on an H100.
#
#   bash benchmarks/gpu_measures.sh [OUT_DIR]
#
# The device image has JAX, flax, optax and orbax but not ml_collections: carry its wheel
# (`pip download --no-deps --only-binary=:all: ml-collections==1.1.0 -d .whl`, then `carry`
# .whl); this script installs any wheels under .whl first. The JSON lines go to stdout and to
# OUT_DIR/gpu_measures.jsonl (default: $OUT when set, else the current folder).
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir="${1:-${OUT:-.}}"
if compgen -G '.whl/*.whl' > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 benchmarks/train_throughput.py --config=configs/cifar10_ddpm.py --batch_size=128 \
    --steps=20 --warmup=3 --config.model.dtype=bfloat16 --compare_diffusers=false \
    | tee -a "$out_dir/gpu_measures.jsonl"
python3 benchmarks/sample_throughput.py --config=configs/cifar10_ddpm.py --batch_size=256 \
    --samplers=ddim --steps=50 --repeats=3 --config.model.dtype=bfloat16 \
    --compare_diffusers=false | tee -a "$out_dir/gpu_measures.jsonl"
