"""Compare on real CPU runs: the same configuration twice is clean, a real 1.5x slowdown is
a regression (the repeat_attention plugin computes its attention 2 or 3 times per call).

At a 20% threshold: on a shared 2-core machine two runs of the same case drift apart by up to
about 10% between runs (more than within one run's p20..p80), so 5% is below what it resolves.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.reports.cli import main as reports_main
from harness.timing import time_closure

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "tests" / "plugins" / "repeat_attention.py"


def sweep(out: Path, repeat: int) -> None:
    args = ["--plugin", str(PLUGIN), "--variant", "repeat_softmax", "--suite", "time",
            "--mode", "fwd", "--non-causal", "--seq-lens", "384,512", "--heads", "4",
            "--head-dim", "32", "--device", "cpu", "--rep-ms", "300", "--in-process",
            "--out", str(out)]
    env = {**os.environ, "ATTNBENCH_TEST_REPEAT": str(repeat)}
    result = subprocess.run([sys.executable, str(REPO / "run_bench.py"), *args], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def verdicts(root: Path, capsys) -> tuple[int, int, str]:
    """Exit codes of compare(a, b) (same config) and compare(a, slow) (1.5x), and the output."""
    for name, repeat in (("a", 2), ("b", 2), ("slow", 3)):
        sweep(root / name, repeat)
    same = reports_main(["compare", str(root / "a"), str(root / "b"), "--threshold", "20%"])
    slower = reports_main(["compare", str(root / "a"), str(root / "slow"), "--threshold", "20%"])
    return same, slower, capsys.readouterr().out


def test_same_config_twice_is_clean_and_a_real_slowdown_is_a_regression(tmp_path, capsys):
    # Other processes on a shared machine can slow one whole run: such an attempt is repeated
    # (at most twice more); the verdicts must come out right in one undisturbed attempt. On a
    # machine loaded beyond its cores the bands widen until a 1.5x change is "within noise"
    # (the honest verdict there): then the test is skipped rather than failed.
    outputs, load = [], 0.0
    for attempt in range(3):
        same, slower, out = verdicts(tmp_path / str(attempt), capsys)
        load = max(load, os.getloadavg()[0])
        if (same, slower) == (0, 1):
            break
        outputs.append(out)
    if (same, slower) != (0, 1) and same == 0 and load > (os.cpu_count() or 1) + 1:
        pytest.skip(f"machine overloaded (load {load:.1f} on {os.cpu_count()} cores): "
                    "a 1.5x slowdown was within its noise")
    assert (same, slower) == (0, 1), "\n".join(outputs)


def test_a_slow_call_is_still_sampled_min_samples_times():
    """One call longer than the whole budget: p20 and p80 come from several samples."""
    calls = []

    def slow():
        calls.append(1)
        torch.randn(200, 200) @ torch.randn(200, 200)

    time_closure(slow, torch.device("cpu"), rep_ms=0.001, min_samples=7)
    assert len(calls) >= 7
