"""Run-time facts go to the `observed` column, apart from `params`; files written before the
column existed still load, compare, plot and report."""
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from harness.config import BenchConfig, RunOptions
from harness.registry import register_variant, unregister_variant
from harness.reports.cli import main as reports_main
from harness.results import COLUMNS, ResultsWriter, load_results
from harness.runner import Sweep

REPO = Path(__file__).resolve().parent.parent
OLD_RUN = REPO / "results" / "h200" / "fmm_backward" / "before"  # written without `observed`


class CountingAttention:
    """Exact-enough toy attention that reports how often it was called."""

    def __init__(self):
        self.calls = 0

    def __call__(self, q, k, v):
        self.calls += 1
        return v * 1.0

    def observations(self) -> dict:
        return {"calls": self.calls}


@pytest.fixture
def counting():
    register_variant("counting", family="linear", causal=(False,),
                     params={"scale": 1})(lambda shape, scale: CountingAttention())
    yield
    unregister_variant("counting")


def test_observations_are_recorded_after_the_measured_calls(tmp_path, counting):
    config = BenchConfig(variants=("counting",), suites=("time",), modes=("fwd",),
                         seq_lens=(16,), heads=1, head_dim=8, causal=(False,), rep_ms=2.0,
                         warmup_ms=1.0, min_samples=3)
    run = Sweep(config, tmp_path / "run", options=RunOptions(isolate=False)).run(["test"])
    df = load_results(run)
    assert list(df.columns) == list(COLUMNS)
    observed = [json.loads(o) for o in df.observed]
    # Asked after timing: the build's first call, the warm-up and at least 3 timed samples.
    assert all(o["calls"] >= 5 for o in observed)
    assert {json.dumps(json.loads(p)) for p in df.params} == {'{"scale": 1}'}


def test_results_without_the_observed_column_load_compare_plot_and_report(tmp_path):
    header = (OLD_RUN / "results.csv").read_text().splitlines()[0].split(",")
    assert "observed" not in header  # the committed run predates the column
    old = tmp_path / "old"
    shutil.copytree(OLD_RUN, old)
    df = load_results(old)
    assert list(df.columns) == list(COLUMNS) and set(df.observed) == {"{}"}
    # A resumed old run is rewritten with the column, so that new rows line up.
    upgraded = tmp_path / "upgraded"
    shutil.copytree(OLD_RUN, upgraded)
    ResultsWriter(upgraded, "upgraded").close()
    assert pd.read_csv(upgraded / "results.csv").columns.tolist() == list(COLUMNS)
    assert reports_main(["compare", str(old), str(upgraded)]) == 0  # same values: no change
    assert reports_main(["plot", str(old)]) == 0
    assert list((old / "plots").glob("scaling-*.png"))
    assert reports_main(["report", str(old)]) == 0
