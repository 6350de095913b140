"""`run_bench.py compare` on pytest-benchmark JSON files (benchmarks/test_speed.py): against
each other or against a tidy results CSV, and one-line errors for files it cannot read."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.reports.cli import main
from tests.test_reports import META, timed, write_run

CASE = {"variant": "softmax_sdpa", "family": "softmax", "params": "{}", "suite": "time",
        "mode": "fwd", "batch": 1, "heads": 2, "seq_len": 1024, "head_dim": 64, "dtype": "bf16",
        "causal": False, "device": "cuda", "inputs": "randn"}  # fmt: skip
MACHINE = {"cpu": {"brand_raw": "x"}, "gpu": "NVIDIA H100", "driver": "1", "cuda": "12",
           "torch": "2.11", "triton": "3.6"}  # fmt: skip


def bench_json(path: Path, ms: float, case: dict | None = CASE, machine: dict = MACHINE) -> Path:
    """A file as pytest-benchmark writes it for one test_speed.py case taking `ms` (p20/p80
    2% either side)."""
    info = {"time_ms": ms, "time_ms_p20": 0.98 * ms, "time_ms_p80": 1.02 * ms, "gbps": 1.0 / ms,
            "tflops": None, "roofline_frac": None, "peak_mem_mib": 8.0}
    if case is not None:
        info["case"] = case
    bench = {"name": "test_speed[softmax_sdpa-N1024-fwd-full]", "stats": {"median": ms * 1e-3},
             "extra_info": info}
    path.write_text(json.dumps({"machine_info": machine, "benchmarks": [bench]}))
    return path


def test_compare_reads_benchmark_json_and_csv(tmp_path, capsys):
    old = bench_json(tmp_path / "old.json", 1.0)
    assert main(["compare", str(old), str(bench_json(tmp_path / "same.json", 1.01))]) == 0
    slower = bench_json(tmp_path / "slow.json", 2.0, machine={**MACHINE, "torch": "2.12"})
    assert main(["compare", str(old), str(slower)]) == 1
    out = capsys.readouterr()
    assert "1 regressions" in out.out and "torch differs: 2.11 (old) vs 2.12 (new)" in out.err
    csv_run = write_run(tmp_path / "run", timed("softmax_sdpa", "softmax", 1024, 1.0, heads=2,
                                               inputs="randn"),
                        META)
    assert main(["compare", str(csv_run), str(slower)]) == 1
    assert main(["compare", str(old), str(slower), "--metric", "peak_mem_mib"]) == 0


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ('{"benchmarks": 3}', "is not a pytest-benchmark JSON file"),
    (None, "has no attnbench case in its extra_info"),
])  # fmt: skip
def test_unreadable_benchmark_json_is_one_line_exit_2(tmp_path, capsys, content, message):
    bad = tmp_path / "bad.json"
    if content is None:
        bench_json(bad, 1.0, case=None)
    else:
        bad.write_text(content)
    assert main(["compare", str(bad), str(bench_json(tmp_path / "ok.json", 1.0))]) == 2
    err = capsys.readouterr().err
    assert message in err and str(bad) in err and err.count("\n") == 1
