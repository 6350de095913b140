"""Faults cost one case: the fault-injection plugin swept in the worker process and in
process, --fail-fast, and Ctrl-C."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from harness.config import BenchConfig, RunOptions
from harness.plugins import load_plugins
from harness.results import load_results
from harness.runner import Sweep
from variants import load_builtin_variants

REPO = Path(__file__).resolve().parent.parent
FAULTS = REPO / "tests" / "plugins" / "faults.py"
load_builtin_variants()
load_plugins([FAULTS])


def fault_config(*variants: str, **kw) -> BenchConfig:
    base = dict(variants=variants, seq_lens=(32,), heads=1, head_dim=8, causal=(True,),
                suites=("time", "accuracy"), modes=("fwd", "fwd_bwd"), rep_ms=2.0,
                warmup_ms=1.0, min_samples=3, plugins=(str(FAULTS),))
    return BenchConfig(**{**base, **kw})


def statuses(run_dir: Path) -> dict[tuple[str, str, str], str]:
    df = load_results(run_dir)
    cases = df.drop_duplicates(["variant", "suite", "mode"], keep="first")
    return {(r.variant, r.suite, r.mode): r.status for r in cases.itertuples()}


def test_fault_sweep_in_the_worker_gets_each_status(tmp_path):
    config = fault_config("fault_healthy", "fault_raise", "fault_nan", "fault_oom",
                          "fault_hang", "fault_abort")
    run = Sweep(config, tmp_path / "run", options=RunOptions(case_timeout=4)).run(["test"])
    got = statuses(run)
    expected = {}
    for suite, mode in (("time", "fwd"), ("time", "fwd_bwd"), ("accuracy", "fwd"),
                        ("accuracy", "fwd_bwd")):
        expected.update({
            ("fault_healthy", suite, mode): "ok", ("fault_raise", suite, mode): "error",
            ("fault_nan", suite, mode): "nan", ("fault_oom", suite, mode): "oom",
            ("fault_abort", suite, mode): "error",
            # the backward hangs: that case times out, the worker is replaced, the rest runs
            ("fault_hang", suite, mode): "timeout" if mode == "fwd_bwd" else "ok",
        })  # fmt: skip
    assert got == expected
    df = load_results(run)
    reasons = df.drop_duplicates(["variant", "mode", "suite"]).set_index(["variant", "mode"])
    assert "SIGABRT" in reasons.loc[("fault_abort", "fwd"), "reason"].iloc[0]
    assert "--case-timeout" in reasons.loc[("fault_hang", "fwd_bwd"), "reason"].iloc[0]
    assert "can't allocate memory" in reasons.loc[("fault_oom", "fwd"), "reason"].iloc[0]
    healthy = df[(df.variant == "fault_healthy") & (df.status == "ok")]
    metrics = {"time_ms", "time_ms_p20", "rel_err_vs_reference", "future_key_leak"}
    assert metrics <= set(healthy.metric)
    assert (run / "worker.log").is_file()


def test_fault_sweep_in_process_records_raise_nan_and_cpu_oom(tmp_path):
    config = fault_config("fault_healthy", "fault_raise", "fault_nan", "fault_oom",
                          suites=("time",), modes=("fwd",), seq_lens=(32, 64))
    run = Sweep(config, tmp_path / "run", options=RunOptions(isolate=False)).run(["test"])
    df = load_results(run)
    by = {(r.variant, r.seq_len): (r.status, r.reason)
          for r in df[df.metric == "time_ms"].itertuples()}
    assert by[("fault_oom", 32)][0] == "oom"  # the CPU allocator's refusal is an OOM
    assert by[("fault_oom", 64)] == ("oom", "skipped after OOM at N=32")
    assert by[("fault_raise", 64)] == ("error", "RuntimeError: injected fault")
    assert by[("fault_nan", 32)][0] == "nan" and by[("fault_healthy", 64)][0] == "ok"


def test_fail_fast_stops_at_the_first_failed_row(tmp_path):
    config = fault_config("fault_healthy", "fault_raise", "fault_nan", suites=("time",),
                          modes=("fwd",))
    sweep = Sweep(config, tmp_path / "run", options=RunOptions(isolate=False, fail_fast=True))
    sweep.run(["test"])
    df = load_results(tmp_path / "run")
    assert sweep.stopped_at.status == "error" and sweep.written == 2
    assert set(df.variant) == {"fault_healthy", "fault_raise"}  # fault_nan never ran


def run_bench(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "run_bench.py"), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_fail_fast_and_ctrl_c_on_the_command_line(tmp_path):
    common = ["--plugin", str(FAULTS), "--device", "cpu", "--seq-lens", "32", "--heads", "1",
              "--head-dim", "8", "--suite", "time", "--mode", "fwd", "--rep-ms", "2",
              "--causal"]
    failing = run_bench(*common, "--variant", "fault_healthy,fault_nan,fault_raise",
                        "--fail-fast", "--in-process", "--out", str(tmp_path / "ff"))
    out, err = failing.communicate(timeout=120)
    assert failing.returncode == 1, err
    assert "stopped at the first non-ok row (--fail-fast): fault_nan" in err
    # Ctrl-C while the worker hangs: one line, the count and the resume command, exit 130
    run_dir = tmp_path / "int"
    proc = run_bench(*common, "--variant", "fault_healthy,fault_hang", "--mode", "fwd,fwd_bwd",
                     "--out", str(run_dir))
    deadline = time.time() + 120
    while time.time() < deadline:
        csv = run_dir / "results.csv"
        # 4 rows per case: both healthy cases and hang's fwd; its fwd_bwd then hangs
        if csv.is_file() and len(pd.read_csv(csv)) >= 12:
            break
        time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last == (f"interrupted: 3 cases written to {run_dir / 'results.csv'}; continue with: "
                    f"python run_bench.py --resume {run_dir}")
    assert "Traceback" not in err
