#!/usr/bin/env bash
# One call on a lent machine with several GPUs: a sweep on one GPU and sharded over all of them
# (torchrun, one process per GPU), for the speed-up and the agreement of their rows; then the
# whole sweep sharded, resumable. Every run directory travels back in $OUT/runs.tar.
#   bash scripts/device_sharded.sh OUT_DIR SUBSET_LENS SECONDS [run_bench.py args...]
# e.g.  bash scripts/device_sharded.sh results/h200x4 1024,4096,16384 560 --preset fig6 \
#           --suite time,memory
# OUT_DIR/single and OUT_DIR/sharded_subset: the sweep at SUBSET_LENS on GPU 0 and sharded;
# OUT_DIR/fig6: the whole sweep sharded (run again to resume it). GPUS=N overrides the count
# (with --device cpu this runs on the CPU, for a check of the script itself).
set -uo pipefail
out_dir=${1:?output directory}; subset=${2:?subset of lengths}; seconds=${3:?time budget}
shift 3
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}; mkdir -p "$out" "$out_dir"
. "$(dirname "$0")/carry_wheels.sh"  # optional peers carried as wheels
gpus=${GPUS:-$(nvidia-smi -L | wc -l)}
log="$out/log.txt"; : > "$log"
deadline=$(( $(date +%s) + seconds ))
left() { echo $(( deadline - $(date +%s) )); }
sharded=(python3 -m torch.distributed.run --nproc-per-node "$gpus" --standalone run_bench.py)
timed() {  # timed LABEL COMMAND...: run it within the time left; log its wall-clock seconds
  local label=$1 start=$(date +%s); shift
  timeout --signal=INT "$(left)" "$@" >>"$log" 2>&1
  echo "$label: exit $?, $(( $(date +%s) - start )) s wall-clock" >>"$out/walls.txt"
}
if [ ! -f "$out_dir/single/meta.json" ]; then
  timed "one GPU, N=$subset" env CUDA_VISIBLE_DEVICES=0 python3 run_bench.py \
    --out "$out_dir/single" "$@" --seq-lens "$subset"
  timed "$gpus processes, N=$subset" "${sharded[@]}" --out "$out_dir/sharded_subset" "$@" \
    --seq-lens "$subset"
  python3 run_bench.py compare "$out_dir/single" "$out_dir/sharded_subset" >>"$out/compare.txt" 2>&1
fi
if [ -f "$out_dir/fig6/meta.json" ]; then
  timed "$gpus processes, whole sweep (resumed)" "${sharded[@]}" --resume "$out_dir/fig6"
else
  timed "$gpus processes, whole sweep" "${sharded[@]}" --out "$out_dir/fig6" "$@"
fi
python3 run_bench.py compare "$out_dir/single" "$out_dir/fig6" >>"$out/compare.txt" 2>&1
tar -cf "$out/runs.tar" "$out_dir"
cat "$out/walls.txt"; grep -v '━' "$out/compare.txt" | tail -40
python3 - "$out_dir/fig6/meta.json" <<'PY'
import json, sys
from pathlib import Path
meta = Path(sys.argv[1])
sharding = json.loads(meta.read_text()).get("sharding", {}) if meta.exists() else {}
for rank in sharding.get("ranks", []):  # each process's GPU and calibration
    print({k: rank.get(k) for k in ("rank", "host", "gpu", "calibration")})
PY
