#!/usr/bin/env bash
# One call on a lent GPU machine: (re)start the fig6 sweep into results/<gpu>/fig6, stop
# cleanly before the call's time limit, and copy what was measured to $OUT. Run it again to
# resume where it stopped (the partial run directory travels with the working tree).
#   bash scripts/device_sweep.sh RUN_DIR SECONDS [extra run_bench.py args...]
set -uo pipefail
run_dir=${1:?run directory}; seconds=${2:?time budget}; shift 2
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}; mkdir -p "$out"
. "$(dirname "$0")/carry_wheels.sh"  # optional peers carried as wheels
if [ -f "$run_dir/meta.json" ]; then args=(--resume "$run_dir"); else args=(--out "$run_dir" "$@"); fi
timeout --signal=INT "$seconds" python3 run_bench.py "${args[@]}" >"$out/log.txt" 2>&1
echo "run_bench exit: $?"
cp "$run_dir/results.csv" "$run_dir/meta.json" "$out/" 2>/dev/null
# Learning curves (task suite) and per-head rows travel as one archive.
extras=$(cd "$run_dir" && ls -d curves heads.csv 2>/dev/null)
[ -n "$extras" ] && tar -C "$run_dir" -cf "$out/extras.tar" $extras
grep -v '━' "$out/log.txt" | tail -60
python3 - "$run_dir" <<'PY'
import sys, pandas as pd
df = pd.read_csv(f"{sys.argv[1]}/results.csv", keep_default_na=False)
print(df.groupby("status").size().to_string())
key = [c for c in ("variant", "suite", "mode", "seq_len", "causal", "inputs", "seed") if c in df]
print("cases:", len(df.drop_duplicates(key)))
PY
