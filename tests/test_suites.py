"""Suites plug in: one file registers a suite (and a family) that runs, writes, summarizes and
compares like the built-ins; registration and run-time errors are one line; no import circles."""
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from harness.reports.compare import compare_runs
from harness.reports.data import Run, tidy
from harness.results import COLUMNS
from harness.suite import (
    Metric, SuiteError, get_suite, higher_is_better, metric_unit, register_suite, unregister_suite,
)  # fmt: skip
from tests.helpers import import_graph

REPO = Path(__file__).resolve().parent.parent

PLUGIN = '''
import torch
from harness.registry import register_family, register_variant
from harness.suite import Metric, Summary, register_suite

register_family("pooling")


@register_variant("mean_values", family="pooling")
def make_mean_values(shape):
    """Every query returns the mean of all value vectors (non-causal only)."""
    return lambda q, k, v: v.mean(dim=-2, keepdim=True).expand_as(v).contiguous()


@register_suite("norm", modes=("fwd",), primary="out_norm", default=False,
                metrics=(Metric("out_norm", "units", higher_is_better=True),),
                summary=(Summary("out_norm", "output norm", "{:.4f}"),))
def run_norm(trial, mode):
    """The Frobenius norm of the output."""
    return {"out_norm": float(torch.linalg.vector_norm(trial.forward().double()))}
'''


def test_a_suite_and_a_family_from_one_plugin_file(tmp_path):
    (tmp_path / "norm_suite.py").write_text(PLUGIN)
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(REPO / "run_bench.py"), "--plugin", "norm_suite.py", "--suite",
         "norm,memory", "--variant", "mean_values,softmax_naive", "--seq-lens", "16", "--heads",
         "1", "--head-dim", "8", "--non-causal", "--mode", "fwd", "--device", "cpu",
         "--in-process", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    df = pd.read_csv(out / "results.csv", keep_default_na=False)
    norm = df[df.suite == "norm"].set_index("variant")
    assert set(norm.index) == {"mean_values", "softmax_naive"}
    assert (norm.unit == "units").all() and (norm.status == "ok").all()
    assert (df.loc[df.variant == "mean_values", "family"] == "pooling").all()
    assert "output norm" in result.stdout  # the suite's own summary table
    # Each value is that variant's own output norm (the suite ran on each, not a constant).
    assert 0 < norm.loc["softmax_naive", "value"] != norm.loc["mean_values", "value"] > 0


@pytest.fixture
def toy_suite():
    @register_suite("toy_rate", modes=("fwd",), primary="toy_per_s",
                    metrics=(Metric("toy_per_s", "1/s", higher_is_better=True),), default=False)
    def run_toy(trial, mode):
        return {"toy_per_s": 1.0, "toy_undeclared": 2.0}

    yield get_suite("toy_rate")
    unregister_suite("toy_rate")


def test_declared_metric_gives_unit_and_direction(toy_suite):
    assert metric_unit("toy_per_s") == "1/s" and higher_is_better("toy_per_s")
    assert metric_unit("time_ms") == "ms" and not higher_is_better("time_ms")
    assert higher_is_better("gbps")

    def run(value: float) -> Run:
        row = dict(run_id="r", variant="v", family="softmax", params="{}", observed="{}",
                   suite="toy_rate", mode="fwd", batch=1, heads=1, seq_len=8, head_dim=8,
                   dtype="fp32", causal=False, device="cpu", inputs="randn", metric="toy_per_s",
                   value=value, unit="1/s", status="ok", reason="")
        frame = pd.DataFrame([{c: row.get(c, "") for c in COLUMNS}], columns=list(COLUMNS))
        return Run(Path("."), tidy(frame), {})

    # Higher is better: a rate that halves is a regression, one that doubles is not.
    assert compare_runs(run(2.0), run(1.0), "toy_per_s").regressions == 1
    assert compare_runs(run(1.0), run(2.0), "toy_per_s").regressions == 0


def test_undeclared_metric_is_an_error_row(toy_suite):
    from harness.config import BenchConfig
    from harness.executor import CaseRunner
    from harness.registry import Shape, VariantConfig, get_variant
    from harness.results import Case
    from variants import load_builtin_variants

    load_builtin_variants()
    runner = CaseRunner(BenchConfig(suites=("toy_rate",)))
    trial = runner.prepare(VariantConfig(get_variant("softmax_naive"), {}), Shape(1, 1, 8, 8))
    case = Case("softmax_naive", "softmax", "{}", "toy_rate", "fwd", 1, 1, 8, 8, "fp32", False,
                "cpu")
    [row] = runner.run_case(trial, case, toy_suite)
    assert row.status == "error" and "toy_undeclared" in row.reason


def test_registration_errors_are_one_line():
    def run(trial, mode):
        return {}

    with pytest.raises(SuiteError, match="metric 'nope' is not declared"):
        register_suite("bad", modes=("fwd",), primary="nope", metrics=())(run)
    with pytest.raises(SuiteError, match="mode 'sideways'"):
        register_suite("bad", modes=("sideways",), primary="m", metrics=(Metric("m", "x"),))
    with pytest.raises(SuiteError, match="'time_ms' is declared by another suite"):
        register_suite("bad", modes=("fwd",), primary="time_ms",
                       metrics=(Metric("time_ms", "s"),))
    with pytest.raises(SuiteError, match="already registered"):
        register_suite("time", modes=("fwd",), primary="m", metrics=(Metric("m", "x"),))(run)
    with pytest.raises(SuiteError, match="unknown suite 'speed'; valid: time, memory, accuracy"):
        get_suite("speed")


def test_no_import_circles():
    graph = import_graph(REPO)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            assert state.get(target) != 1, "import circle: " + " -> ".join(
                path[path.index(target):] + [module, target])
            if target not in state:
                visit(target, path + [module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
