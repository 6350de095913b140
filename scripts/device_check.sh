#!/usr/bin/env bash
# One call on a lent GPU machine: the CUDA tests (`cuda` marker), then the Triton kernels
# timed at the fig6 shape (N = 65536). Logs go to $OUT.
#   bash scripts/device_check.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}; mkdir -p "$out"
. "$(dirname "$0")/carry_wheels.sh"  # optional peers carried as wheels
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}  # the bench imports the repo's packages
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
timeout 300 python3 -m pytest -q -x -m cuda tests/ -p no:cacheprovider 2>&1 | tee "$out/cuda_tests.log" | tail -25
timeout 240 python3 benchmarks/variant_times.py window_triton linear_triton fmmformer_triton \
    fma_triton --param window_triton.bandwidth=30 --log variant_times.log 2>&1 | tail -40
