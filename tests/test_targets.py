"""Kernel-target arithmetic on hand-made rows."""
import pandas as pd

from studies.fmmformer.targets import evaluate_targets
from harness.results import COLUMNS

N = 65536


def row(variant, metric, value, mode="fwd", causal=False, suite="time", n=N):
    return dict(run_id="t", variant=variant, family="fmm", params="{}", suite=suite, mode=mode,
                batch=1, heads=16, seq_len=n, head_dim=64, dtype="bf16", causal=causal,
                device="cuda", metric=metric, value=value, unit="", status="ok", reason="")


def test_targets_met_missed_and_not_measured():
    rows = [
        row("fmmformer_triton", "gbps", 1600.0),            # >= 1500 of a 3000 GB/s copy: met
        row("fmmformer_triton", "time_ms", 1.0),
        row("fmmformer_triton", "time_ms", 5.0, mode="fwd_bwd"),  # 5x its forward: missed
        row("fmmformer_triton", "peak_mem_mib", 130.0, suite="memory"),  # o is 128 MiB: met
        row("window_flex", "time_ms", 0.5),
        row("linear", "time_ms", 0.4),
        row("fma_triton", "time_ms", 0.5, n=2**14),
        row("fma_triton", "time_ms", 1.0),                  # slope 0.5 between 2^14 and 2^16
    ]
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    table = evaluate_targets(df, {"roofline": {"copy_gbps": 3000.0, "matmul_tflops": 700.0}})
    verdict = dict(zip(table.target, table.verdict))
    measured = dict(zip(table.target, table.measured))
    assert verdict["1. fmmformer_triton fwd non-causal GB/s (q,k,v,o once) >= 50% of copy"] == "met"
    assert verdict["3. fmmformer_triton fwd_bwd / fwd"] == "missed"
    assert measured["3. fmmformer_triton fwd_bwd / fwd"] == 5.0
    # (0.5 + 0.4) / 2 = 0.45 ms allowed, 1.0 measured
    assert verdict["2. fmmformer_triton fwd time <= (window_flex + best linear) / 2.0"] == "missed"
    assert verdict["6. fmmformer_triton fwd peak extra memory <= 1.1 x output"] == "met"
    assert abs(measured["2. fma_triton fwd time_ms log-log slope 2^14..N"] - 0.5) < 1e-9
    assert verdict["7. fmmformer_triton causal fwd / non-causal fwd"] == "not measured"
