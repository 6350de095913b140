#!/usr/bin/env bash
# One call on a lent GPU machine: the CUDA correctness tests of every Triton kernel, then the
# FMMformer kernel's GPU bench (targets of issue 3 measured in isolation). Logs go to $OUT.
#   bash scripts/device_check.sh [--sweep]
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}; mkdir -p "$out"
. "$(dirname "$0")/carry_wheels.sh"  # optional peers carried as wheels
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}  # the bench imports the repo's packages
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
timeout 300 python3 -m pytest -q -x -k cuda tests/ -p no:cacheprovider 2>&1 | tee "$out/cuda_tests.log" | tail -25
timeout 240 python3 tests/test_fmmformer_triton.py "$@" 2>&1 | tail -40
