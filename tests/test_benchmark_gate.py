"""The pytest-benchmark regression gate (benchmarks/test_speed.py): a saved baseline, then a
compare run that fails on a median regression and one that passes unchanged; `run_bench.py
compare` reaches the same verdicts on the saved JSON files."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from harness.reports.cli import main as report_main

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "tests" / "plugins" / "busy_attention.py"


def bench(storage: Path, *args: str, slowdown: float = 1) -> subprocess.CompletedProcess:
    """One pytest-benchmark run of the busy variant's single case in a fresh process, timed by
    process CPU time (the variant's cost does not depend on the machine's load then) on one
    thread (idle worker threads spinning would count too)."""
    env = {**os.environ, "ATTNBENCH_TEST_SLOWDOWN": str(slowdown), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
        str(REPO / "benchmarks" / "test_speed.py"), "--attn-plugin", str(PLUGIN),
        "--attn-variants", "busy_softmax", "--attn-lengths", "33", "--attn-modes", "fwd",
        "--attn-causal", "false", "--attn-device", "cpu", "--benchmark-warmup=off",
        "--benchmark-timer=time.process_time",
        "--benchmark-min-rounds=5", "--benchmark-max-time=0.05",
        f"--benchmark-storage=file://{storage}", *args,
    ]  # fmt: skip
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def test_compare_fail_catches_a_slowed_variant_and_passes_an_unchanged_one(tmp_path):
    saved = bench(tmp_path, "--benchmark-save=baseline")
    assert saved.returncode == 0, saved.stdout + saved.stderr
    assert len(list(tmp_path.rglob("0001_baseline.json"))) == 1
    gate = ("--benchmark-compare=0001", "--benchmark-compare-fail=median:50%")
    slowed = bench(tmp_path, *gate, f"--benchmark-json={tmp_path / 'slowed.json'}", slowdown=3)
    assert slowed.returncode != 0, slowed.stdout
    assert "Performance has regressed" in slowed.stdout + slowed.stderr
    assert "busy_softmax-N33-fwd-full" in slowed.stdout + slowed.stderr
    unchanged = bench(tmp_path, *gate, f"--benchmark-json={tmp_path / 'unchanged.json'}")
    assert unchanged.returncode == 0, unchanged.stdout + unchanged.stderr

    baseline = str(next(tmp_path.rglob("0001_baseline.json")))
    compare = ["compare", baseline, "--threshold", "50%"]
    assert report_main([*compare[:2], str(tmp_path / "slowed.json"), *compare[2:]]) == 1
    assert report_main([*compare[:2], str(tmp_path / "unchanged.json"), *compare[2:]]) == 0


def test_bad_case_options_are_one_line_exit_2(tmp_path):
    """Bad --attn-* input stops the benchmark session before any case: one line naming the
    valid choices, exit 2, no traceback."""
    for option, value, expected in (("--attn-causal", "maybe", "valid: false, true"),
                                    ("--attn-lengths", "x", "expects an integer")):
        run = bench(tmp_path, option, value)
        lines = (run.stdout + run.stderr).strip().splitlines()
        assert run.returncode == 2 and len(lines) == 1 and expected in lines[0], lines
        assert "Traceback" not in run.stderr
