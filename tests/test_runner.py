"""The sweep: tidy CSV schema, resume, OOM / error / NaN rows, and a small end-to-end run."""
import json

import pandas as pd
import pytest
import torch

from harness.config import BenchConfig, RunOptions
from harness.registry import register_variant, unregister_variant
from harness.results import COLUMNS, ResultsError, load_results
from harness.runner import Sweep as _Sweep
from variants import load_builtin_variants

load_builtin_variants()


IN_PROCESS = RunOptions(isolate=False, case_timeout=0)


def Sweep(config, run_dir, **kw):  # noqa: N802 - the runner's Sweep, in this process
    return _Sweep(config, run_dir, options=kw.pop("options", IN_PROCESS), **kw)


def tiny(**kw) -> BenchConfig:
    base = dict(variants=("softmax_naive", "fmmformer"), seq_lens=(32, 64), heads=2,
                head_dim=16, rep_ms=5.0, warmup_ms=1.0, accuracy_rows=48, min_samples=3)
    return BenchConfig(**{**base, **kw})


@pytest.fixture
def failing_variants():
    """Variants that fail in controlled ways: OOM from N >= 64, an error, NaN output."""

    @register_variant("oom_above_48", family="softmax")
    def make_oom(shape):
        def call(q, k, v):
            if shape.seq_len >= 64:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64 GiB")
            return v.clone()
        return call

    @register_variant("broken", family="softmax")
    def make_broken(shape):
        def call(q, k, v):
            raise RuntimeError("kernel launch failed\nsecond line")
        return call

    @register_variant("nan_out", family="softmax")
    def make_nan(shape):
        return lambda q, k, v: torch.full_like(v, float("nan"))

    yield
    for name in ("oom_above_48", "broken", "nan_out"):
        unregister_variant(name)


def test_end_to_end_schema_and_values(tmp_path):
    run = Sweep(tiny(), tmp_path / "run").run(["test"])
    df = load_results(run)
    assert list(df.columns) == list(COLUMNS)
    assert set(df.status) == {"ok"}
    assert df.value.notna().all() and (df[df.metric == "time_ms"].value > 0).all()
    # every case present: 2 variants x 2 lengths x 2 causal x (2 time + 2 memory + 2 accuracy:
    # the output and, for fwd_bwd, the gradients)
    cases = df.drop_duplicates(["variant", "suite", "mode", "seq_len", "causal"])
    assert len(cases) == 2 * 2 * 2 * 6
    acc = df[(df.metric == "rel_err_vs_reference")]
    assert (acc.value < 1e-5).all()  # fp32 against its own float64 reference
    naive = df[(df.variant == "softmax_naive") & (df.metric == "rel_err_vs_softmax")]
    assert (naive.value < 1e-5).all()
    sampled = df[(df.suite == "accuracy") & (df.seq_len == 64)]
    assert all(json.loads(o)["ref_rows"] == 48 for o in sampled.observed)
    assert not any("ref_rows" in p for p in df.params)  # an observation, not configuration
    assert set(df.loc[df.suite != "accuracy", "observed"]) == {"{}"}
    meta = json.loads((run / "meta.json").read_text())
    assert meta["config"]["seq_lens"] == [32, 64] and meta["torch"] == torch.__version__


def test_resume_skips_finished_cases(tmp_path):
    run_dir = tmp_path / "run"
    Sweep(tiny(seq_lens=(32,), variants=("softmax_naive",)), run_dir).run(["test"])
    first = load_results(run_dir)
    # Simulate a crash: keep only the first half of the rows (whole cases).
    keep = first.drop_duplicates(["variant", "suite", "mode", "causal"]).iloc[:5]
    kept = first.merge(keep[["variant", "suite", "mode", "causal"]])
    kept.to_csv(run_dir / "results.csv", index=False)
    sweep = Sweep(tiny(seq_lens=(32,), variants=("softmax_naive",)), run_dir)
    assert sweep.total_cases() == len(first.drop_duplicates(
        ["variant", "suite", "mode", "causal"])) - 5
    sweep.run(["test"])
    resumed = load_results(run_dir)
    key = ["variant", "suite", "mode", "causal", "metric"]
    assert len(resumed) == len(first)
    assert not resumed.duplicated(key).any()
    assert Sweep(tiny(seq_lens=(32,), variants=("softmax_naive",)), run_dir).total_cases() == 0


def test_failures_become_rows_and_sweep_goes_on(tmp_path, failing_variants):
    config = tiny(variants=("oom_above_48", "broken", "nan_out", "softmax_naive"),
                  seq_lens=(32, 64, 128), causal=(False,), suites=("time",), modes=("fwd",))
    df = load_results(Sweep(config, tmp_path / "run").run(["test"]))
    by = {(r.variant, r.seq_len): r for r in df[df.metric == "time_ms"].itertuples()}
    assert by[("oom_above_48", 32)].status == "ok"
    assert by[("oom_above_48", 64)].status == "oom"
    assert by[("oom_above_48", 128)].reason == "skipped after OOM at N=64"
    assert by[("broken", 64)].status == "error"
    assert by[("broken", 64)].reason == "RuntimeError: kernel launch failed"
    assert by[("nan_out", 32)].status == "nan"
    assert all(by[("softmax_naive", n)].status == "ok" for n in (32, 64, 128))
    assert df[df.status != "ok"].value.isna().all()


def test_unavailable_variant_is_skipped_with_reason(tmp_path):
    config = tiny(variants=("softmax_flex",), seq_lens=(32,), suites=("time",))
    df = load_results(Sweep(config, tmp_path / "run").run(["test"]))
    assert set(df.status) == {"skipped"} and df.reason.str.contains("cuda").all()


def test_load_results_rejects_malformed(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ResultsError, match="missing run_id"):
        load_results(bad)
    with pytest.raises(ResultsError, match="no results file"):
        load_results(tmp_path / "absent.csv")
    pd.DataFrame(columns=list(COLUMNS)).to_csv(tmp_path / "empty.csv", index=False)
    assert load_results(tmp_path / "empty.csv").empty


def test_summary_lists_never_run_variants_once(tmp_path):
    from harness.summary import skipped_variants, summary_tables

    config = tiny(variants=("softmax_flex", "softmax_naive"), seq_lens=(32,), suites=("time",))
    df = load_results(Sweep(config, tmp_path / "run").run(["test"]))
    assert list(skipped_variants(df)) == ["softmax_flex"]
    tables = summary_tables(df)
    assert [t.title for t in tables] == ["time (ms, median)", "skipped variants"]
    assert tables[0].row_count == 4  # softmax_naive x (fwd, fwd_bwd) x (non-causal, causal)


def test_git_state_env_override_wins(monkeypatch) -> None:
    """A copied tree may carry a stale .git: an explicit ATTNBENCH_GIT_SHA is what gets recorded."""
    from harness.environment import git_state

    monkeypatch.setenv("ATTNBENCH_GIT_SHA", "0123abc")
    monkeypatch.setenv("ATTNBENCH_GIT_DIRTY", "1")
    assert git_state() == ("0123abc", True)
    monkeypatch.delenv("ATTNBENCH_GIT_SHA")
    sha, _ = git_state()
    assert sha != "0123abc"


def test_backend_detection_prints_nothing_and_bar_shows_eta(tmp_path, capfd):
    """The profiler's native USDT lines must not land in the progress bar; the bar has an ETA."""
    from io import StringIO

    from rich.console import Console

    bar = StringIO()
    config = tiny(variants=("softmax_sdpa",), seq_lens=(32,), suites=("accuracy",),
                  causal=(False,))
    run = Sweep(config, tmp_path / "run", console=Console(file=bar, width=200,
                                                         force_terminal=True)).run(["test"])
    captured = capfd.readouterr()
    assert "USDT" not in captured.out + captured.err + bar.getvalue()
    assert "eta" in bar.getvalue()
    row = load_results(run).iloc[0]
    assert json.loads(row.observed)["backend_ran"] in ("math", "flash", "efficient", "cudnn")
    assert json.loads(row.params) == {"backend": "auto"}


def test_cpu_size_estimate_warns_on_a_large_sweep(tmp_path, monkeypatch):
    import harness.estimate
    from harness.estimate import attention_gflops, size_warning

    assert 0 < attention_gflops(torch.float32) < 1e5  # the calibration itself
    # this machine's rate varies with its other load: fix it at a 2-core CPU's typical one
    monkeypatch.setattr(harness.estimate, "attention_gflops", lambda dtype: 10.0)

    # README's custom-sweep example: bf16, H=16, N up to 16384
    big = BenchConfig(variants=("softmax_naive", "fmmformer"), suites=("time", "memory"),
                      seq_lens=(1024, 4096, 16384), heads=16, head_dim=64, dtype="bf16",
                      causal=(True,), modes=("fwd", "fwd_bwd"))
    line = size_warning(_Sweep(big, tmp_path / "big"))
    assert line is not None and line.startswith("warning: 24 cases, roughly ")
    assert "--seq-lens" in line and line.count("\n") == 0
    assert size_warning(_Sweep(tiny(), tmp_path / "small")) is None


def test_an_output_unlike_q_is_an_error_row(tmp_path):
    """A variant returning the wrong shape or dtype is not measured: an `error` row naming
    what it returned and what q is."""
    register_variant("narrow_out", family="softmax")(lambda shape: lambda q, k, v: q[..., :1])
    register_variant("double_out", family="softmax")(lambda shape: lambda q, k, v: v.double())
    try:
        config = tiny(variants=("narrow_out", "double_out"), seq_lens=(32,), suites=("time",),
                      modes=("fwd",), causal=(False,))
        df = load_results(Sweep(config, tmp_path / "run").run(["test"])).set_index("variant")
    finally:
        unregister_variant("narrow_out")
        unregister_variant("double_out")
    assert set(df.status) == {"error"}
    assert df.loc["narrow_out", "reason"] == (
        "output has shape (1, 2, 32, 1) dtype torch.float32 device cpu; expected q's shape "
        "(1, 2, 32, 16) dtype torch.float32 device cpu")
    assert "dtype torch.float64" in df.loc["double_out", "reason"]


def test_resume_drops_a_case_whose_last_line_a_kill_cut(tmp_path):
    from io import StringIO

    from rich.console import Console

    config = tiny(seq_lens=(32,), variants=("softmax_naive",), suites=("time",),
                  causal=(False,))
    run_dir = Sweep(config, tmp_path / "run").run(["test"])
    first = load_results(run_dir)
    in_last = (first["mode"] == first["mode"].iloc[-1]).sum()  # rows of the last case
    text = (run_dir / "results.csv").read_text()
    (run_dir / "results.csv").write_text(text[:-25])  # its last row half written
    log = StringIO()
    Sweep(config, run_dir, console=Console(file=log, width=300)).run(["test"])
    assert f"dropped an unfinished last line and the rows of its case ({in_last} rows)" in log.getvalue()
    resumed = load_results(run_dir)
    assert len(resumed) == len(first) and set(resumed.metric) == set(first.metric)
    assert not resumed.duplicated(["mode", "metric"]).any()


def test_a_lost_workers_reason_names_its_log_file(tmp_path):
    """A sharded run's worker logs to shards/rank-I/worker.log: the reason says that path."""
    from types import SimpleNamespace

    from harness.isolation import Worker

    worker = Worker.__new__(Worker)  # no process: only the reason of its death is made
    worker.process = SimpleNamespace(join=lambda timeout: None, exitcode=-9)
    worker.log_path = tmp_path / "shards" / "rank-1" / "worker.log"
    assert worker._died().reason == (f"worker process died (killed by SIGKILL); its output is in "
                                     f"{worker.log_path}")
