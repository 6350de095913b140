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


def write_run(root, name, rows, meta):
    """A run directory of hand-made rows and meta.json."""
    import json

    path = root / name
    path.mkdir()
    pd.DataFrame(rows, columns=list(COLUMNS)).assign(run_id=name, inputs="randn").to_csv(
        path / "results.csv", index=False)
    (path / "meta.json").write_text(json.dumps({"run_id": name, **meta}))
    return path


def test_targets_read_one_configuration_and_name_their_runs():
    """Rows of another configuration at a lower length do not enter the slope, and each
    target names the run its values come from (the last of several)."""
    other = [dict(row("fma_triton", "time_ms", 9.0, n=2**14), heads=8, run_id="b")]
    rows = [row("fma_triton", "time_ms", 0.5, n=2**14), row("fma_triton", "time_ms", 1.0),
            row("window_flex", "time_ms", 7.0), dict(row("window_flex", "time_ms", 0.5),
                                                     run_id="later")]
    df = pd.DataFrame(rows + other, columns=list(COLUMNS)).assign(inputs="randn")
    table = evaluate_targets(df, {}).set_index("target")
    slope = table.loc["2. fma_triton fwd time_ms log-log slope 2^14..N"]
    assert abs(slope.measured - 0.5) < 1e-9 and slope.runs == "t"
    peers = table.loc["2. fmmformer_triton fwd time <= (window_flex + best linear) / 2.0"]
    assert peers.runs == "later" and peers.verdict == "not measured"


def test_pooling_runs_of_two_configurations_or_gpus_is_one_line_exit_2(tmp_path, capsys):
    import run_bench

    gpu = {"gpu": "NVIDIA H200", "roofline": {"copy_gbps": 3000.0}}
    first = write_run(tmp_path, "a", [row("fmmformer_triton", "time_ms", 1.0)],
                      {"gpu": "NVIDIA H200"})
    same = write_run(tmp_path, "b", [row("fmmformer_triton", "gbps", 1600.0)], gpu)
    wide = write_run(tmp_path, "c", [dict(row("window_flex", "time_ms", 0.5), heads=8)], gpu)
    other_gpu = write_run(tmp_path, "d", [row("window_flex", "time_ms", 0.5)],
                          {"gpu": "NVIDIA H100"})
    for runs, expected in (([first, wide], "the rows at N=65536 hold 2 configurations"),
                           ([first, other_gpu], "measured on different GPUs")):
        assert run_bench.main(["targets", *map(str, runs)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and expected in err, err
    assert run_bench.main(["targets", str(first), str(same)]) == 0
    text = (first / "targets.md").read_text()
    assert "roofline of b" in text  # the first run has none: the second's is used
    assert "| fmmformer | 1. fmmformer_triton fwd non-causal GB/s (q,k,v,o once) >= 50% of " \
           "copy | 1600 | >= 1.5e+03 GB/s | met | b |" in text
