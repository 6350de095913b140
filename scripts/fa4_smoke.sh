#!/usr/bin/env bash
# One call on a lent GPU machine: install flash-attn-4 and its CuTe DSL libraries from carried
# wheels (a wheel too large for one carry comes as NAME.whl.part-aa, -ab, ... in any of the
# folders), then import flash_attn.cute, run the CUDA peer and timing tests, a small time and
# accuracy sweep of the flash-attn variants beside SDPA, and their pytest-benchmark cases.
# Logs, results.csv, meta.json and the benchmark JSON go to $OUT.
#   bash scripts/fa4_smoke.sh .whl/fa4a .whl/fa4b
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}; mkdir -p "$out"
wheels=/tmp/fa4_wheels; rm -rf "$wheels"; mkdir -p "$wheels"
for dir in "$@"; do cp "$dir"/*.whl "$wheels"/ 2>/dev/null; done
for dir in "$@"; do  # parts in suffix order (aa, ab, ...), each appended to its wheel
  for part in "$dir"/*.whl.part-*; do [ -e "$part" ] && echo "${part##*.part-} $part"; done
done | sort | while read -r _ part; do
  name=$(basename "${part%.part-*}"); cat "$part" >> "$wheels/$name"
done
ls -la "$wheels"
python3 -c "import sys, zipfile; [zipfile.ZipFile(w).testzip() for w in sys.argv[1:]]" \
  "$wheels"/*.whl || { echo "a wheel is incomplete: were all its parts carried? (a part from an" \
  "earlier call is gone once the machine has been given back: make every call again)"; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "$wheels"/*.whl || exit 1
# A --target folder is no site folder: its .pth files are not read, so the CuTe DSL's own
# packages folder goes on the path by hand.
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:.
# Compiled kernels kept on disk: the sweep's worker processes and later calls reuse them.
export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=/tmp/fa4_cache
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 - <<'PY' 2>&1 | tee "$out/import.log"
import importlib.metadata as md, torch
from flash_attn.cute import flash_attn_func
print("torch", torch.__version__, "flash-attn-4", md.version("flash-attn-4"),
      "nvidia-cutlass-dsl", md.version("nvidia-cutlass-dsl"), "quack", md.version("quack-kernels"))
q = torch.randn(1, 1024, 16, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
out, lse = flash_attn_func(q, q, q, causal=True, window_size=(30, 0))
out.sum().backward()
print("flash_attn.cute ran: out", tuple(out.shape), "grad", tuple(q.grad.shape))
PY
timeout 420 python3 -m pytest -q -p no:cacheprovider -rs tests/test_peers.py tests/test_timing.py \
  2>&1 | tee "$out/cuda_tests.log" | tail -25
run=/tmp/fa4_run; rm -rf "$run"
timeout 420 python3 run_bench.py --out "$run" --suite time,accuracy --dtype bf16 --heads 16 \
  --head-dim 64 --seq-lens 1024,4096,16384 --mode fwd,fwd_bwd \
  --variant softmax_sdpa,softmax_flash_attn,window_flash_attn,window_triton,softmax_xformers \
  > "$out/sweep.log" 2>&1
echo "run_bench exit: $?"
cp "$run/results.csv" "$run/meta.json" "$out/" 2>/dev/null
grep -v '━' "$out/sweep.log" | tail -40
timeout 300 python3 -m pytest -q -p no:cacheprovider benchmarks/test_speed.py \
  --attn-variants softmax_sdpa,softmax_flash_attn,window_flash_attn --attn-lengths 4096 \
  --benchmark-json "$out/bench.json" 2>&1 | tee "$out/bench.log" | grep -v '^$' | tail -20
