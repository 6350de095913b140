#!/usr/bin/env bash
# On a CUDA machine: a small sweep, isolated in the worker process (the default), in which one
# variant's Triton kernel performs a real illegal memory access (tests/plugins/gpu_faults.py)
# beside healthy variants. Passes (exit 0) when every case of the faulting variant is an
# `error` row naming the illegal access and every case of the others is `ok`.
#   bash scripts/illegal_access_check.sh OUT_DIR
# OUT_DIR receives log.txt (the sweep's output), rows.txt (status per case), the run directory
# run/ (results.csv, meta.json, worker.log) and exit.txt.
set -uo pipefail
out=${1:?usage: scripts/illegal_access_check.sh OUT_DIR}
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
mkdir -p "$out"
run="$out/run"
if [ -e "$run" ]; then echo "$run exists: give a fresh OUT_DIR" >&2; exit 2; fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/log.txt"
echo "${ATTNBENCH_GIT_SHA:-$(git rev-parse HEAD 2>/dev/null)}" | tee -a "$out/log.txt"
timeout 900 python3 run_bench.py --device cuda \
    --plugin tests/plugins/gpu_faults.py --plugin tests/plugins/faults.py \
    --variant softmax_sdpa,fault_illegal_access,window_triton,fault_healthy \
    --seq-lens 1024,2048 --heads 4 --head-dim 64 --dtype bf16 \
    --suite time,memory,accuracy --mode fwd,fwd_bwd --case-timeout 120 \
    --out "$run" >>"$out/log.txt" 2>&1
status=$?
echo "run_bench exit: $status" | tee -a "$out/log.txt"
python3 - "$run" <<'PY' | tee "$out/rows.txt"
import sys

import pandas as pd

df = pd.read_csv(f"{sys.argv[1]}/results.csv", keep_default_na=False)
cases = df.drop_duplicates(["variant", "suite", "mode", "seq_len", "causal"])
cols = ["variant", "seq_len", "causal", "suite", "mode", "status", "reason"]
with pd.option_context("display.width", 250, "display.max_colwidth", 120,
                       "display.max_rows", 500):
    print(cases[cols].to_string(index=False))
fault = cases[cases.variant == "fault_illegal_access"]
healthy = cases[cases.variant != "fault_illegal_access"]
expected = 4 * 2 * 2 * 6  # variants x lengths x causal flags x 2 modes x (time, memory, accuracy)
checks = {
    "every case has a row": len(cases) == expected,
    "illegal access: every case an error row": len(fault) > 0 and (fault.status == "error").all(),
    "illegal access named in the reason": fault.reason.str.contains("illegal memory access").all(),
    "every healthy case ok": len(healthy) > 0 and (healthy.status == "ok").all(),
}
for name, ok in checks.items():
    print(f"{'PASS' if ok else 'FAIL'}: {name}")
sys.exit(0 if all(checks.values()) else 1)
PY
verdict=${PIPESTATUS[0]}
echo "run_bench exit $status, check exit $verdict" | tee "$out/exit.txt"
exit "$verdict"
