"""Reports: figures, compare exit codes and noise, claim-check arithmetic, slopes, README."""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from harness.reports.analysis import crossover, crossovers, fit_slope, slopes
from harness.reports.cli import main
from harness.reports.data import load_run, tidy
from harness.reports.plots import accuracy_figure, scaling_figure
from harness.reports.readme import END, START, marker_span
from harness.results import COLUMNS, ResultsError
from harness.suite import metric_unit
from studies.fmmformer.claims import claim_check
from tests.helpers import import_graph

FMM = json.dumps({"bandwidth": 30, "blend": "sigmoid", "kernels": 3})
META = {"run_id": "r1", "command": "python run_bench.py run", "preset": "fig6", "device": "cuda",
        "gpu": "NVIDIA H100", "driver": "1", "cuda": "12", "torch": "2.11", "triton": "3.6",
        "python": "3.11", "git_sha": "abc", "git_dirty": False, "roofline": None}


def row(variant: str = "softmax_naive", family: str = "softmax", n: int = 1024,
        value: float | None = 1.0, **over) -> dict:
    """One results row with the exact columns; `over` replaces any column."""
    r = dict(run_id="r1", variant=variant, family=family, params="{}", suite="time", mode="fwd",
             batch=1, heads=2, seq_len=n, head_dim=64, dtype="bf16", causal=False, device="cuda",
             metric="time_ms", value=value, unit="", status="ok", reason="")
    r.update(over)
    r["unit"] = metric_unit(r["metric"])
    if r["status"] != "ok":
        r["value"] = None
    return r


def timed(variant: str, family: str, n: int, ms: float, band: float = 0.02, **over) -> list[dict]:
    """time_ms with its p20/p80 at ms * (1 -+ band)."""
    return [row(variant, family, n, ms * f, metric=m, **over)
            for m, f in (("time_ms", 1), ("time_ms_p20", 1 - band), ("time_ms_p80", 1 + band))]


def write_run(root: Path, rows: list[dict], meta: dict | None = META) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(root / "results.csv", index=False)
    if meta is not None:
        (root / "meta.json").write_text(json.dumps(meta))
    return root


def sweep_rows(modes: tuple[str, ...] = ("fwd", "fwd_bwd"),
               flags: tuple[bool, ...] = (False, True)) -> list[dict]:
    """A small fig6-like sweep: naive softmax OOMs at 2^13 (time and memory)."""
    kinds = {"softmax_naive": ("softmax", "{}", 1e-6, 2),
             "softmax_sdpa": ("softmax", "{}", 1e-7, 2), "fmmformer": ("fmm", FMM, 1e-3, 1)}
    rows = []
    for mode in modes:
        for causal in flags:
            kw = dict(mode=mode, causal=causal)
            for name, (fam, params, c, p) in kinds.items():
                for n in (1024, 2048, 4096, 8192):
                    if name == "softmax_naive" and n == 8192:
                        rows += [row(name, fam, n, status="oom", reason="CUDA OOM", **kw),
                                 row(name, fam, n, suite="memory", metric="peak_mem_mib",
                                     status="oom", reason="CUDA OOM", **kw)]
                        continue
                    rows += timed(name, fam, n, c * n**p, params=params, **kw)
                    rows.append(row(name, fam, n, 0.1 * n / 1024, metric="roofline_frac",
                                    params=params, **kw))
                    rows.append(row(name, fam, n, 1e-3 * n**p, suite="memory",
                                    metric="peak_mem_mib", params=params, **kw))
                rows.append(row(name, fam, 4096, 0.5 if fam == "fmm" else 3e-3, suite="accuracy",
                                metric="rel_err_vs_softmax", params=params, causal=causal))
            rows.append(row("fmmformer", "fmm", 4096, 2e-3, suite="accuracy",
                            metric="rel_err_softmax_floor", causal=causal))
    return tidy(pd.DataFrame(rows, columns=list(COLUMNS))).to_dict("records")  # no duplicates


# ---------------------------------------------------------------- figures


def test_plot_command_writes_nonempty_figures(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", sweep_rows(("fwd",)))
    assert main(["plot", str(run)]) == 0
    pngs = sorted((run / "plots").glob("*.png"))
    kinds = sorted(p.name.split("-")[0] for p in pngs)
    assert kinds == ["accuracy", "roofline", "scaling", "speedup"]
    for png in pngs:
        assert png.with_suffix(".svg").stat().st_size > 0
        img = np.asarray(Image.open(png).convert("RGB"))
        assert img.shape[0] > 100 and img.shape[1] > 100
        colors = np.unique(img.reshape(-1, 3), axis=0)
        assert len(colors) > 20, f"{png.name} looks blank"


def test_accuracy_figure_points_and_softmax_floor() -> None:
    fig = accuracy_figure(tidy(pd.DataFrame(sweep_rows(), columns=list(COLUMNS))), "t")
    assert len(fig.axes) == 2  # non-causal, causal at the default length 4096
    for ax in fig.axes:
        points = np.concatenate([c.get_offsets() for c in ax.collections])
        assert sorted(points[:, 1].tolist()) == pytest.approx([3e-3, 3e-3, 0.5])  # err per variant
        assert [ln.get_ydata()[0] for ln in ax.lines] == pytest.approx([2e-3])  # the floor
        assert ax.get_title().startswith("N=4096")


def test_scaling_figure_marks_oom_and_draws_guides() -> None:
    df = tidy(pd.DataFrame(sweep_rows(), columns=list(COLUMNS)))
    fig = scaling_figure(df, "t")
    axes = [ax for ax in fig.axes if ax.get_xscale() == "log"]
    assert len(axes) == 8  # time and memory rows x 4 (mode, causal) panels
    for ax in axes:
        assert ax.get_xaxis().get_scale() == "log" and ax.get_yscale() == "log"
        assert [t.get_text() for t in ax.texts] == ["OOM"]  # naive OOMs at 2^13 in every panel
        # three variant lines (x-mark plotted as its own line) + two guide lines
        labels = {tuple(line.get_xdata()) for line in ax.lines}
        assert (1024, 2048, 4096) in labels  # naive's line ends before its OOM
    # the OOM mark sits at the naive line's last height, at the OOM length
    mark = [ln for ln in axes[0].lines if ln.get_marker() == "x"][0]
    assert mark.get_xdata()[0] == 8192
    assert mark.get_ydata()[0] == pytest.approx(1e-6 * 4096**2)


def test_scaling_figure_of_a_time_only_run_has_one_row() -> None:
    df = tidy(pd.DataFrame(sweep_rows(), columns=list(COLUMNS)))
    fig = scaling_figure(df[df["suite"] == "time"], "t")
    axes = [ax for ax in fig.axes if ax.get_xscale() == "log"]
    assert len(axes) == 4 and all(ax.get_ylabel() in ("", "time (ms)") for ax in axes)
    assert not any(t.get_text() == "no data" for ax in axes for t in ax.texts)


# ---------------------------------------------------------------- compare


def compare_pair(tmp_path: Path, old_rows: list[dict], new_rows: list[dict], *args: str,
                 new_meta: dict | None = META) -> int:
    old = write_run(tmp_path / "old", old_rows)
    new = write_run(tmp_path / "new", new_rows, new_meta)
    return main(["compare", str(old), str(new / "results.csv"), *args])


def test_compare_identical_runs_is_clean(tmp_path: Path, capsys) -> None:
    rows = timed("fmmformer", "fmm", 1024, 10.0)
    assert compare_pair(tmp_path, rows, rows) == 0
    assert "0 regressions" in capsys.readouterr().out


def test_compare_regression_beyond_threshold_and_noise(tmp_path: Path, capsys) -> None:
    old = timed("fmmformer", "fmm", 1024, 10.0) + timed("fmmformer", "fmm", 2048, 20.0)
    new = timed("fmmformer", "fmm", 1024, 12.0) + timed("fmmformer", "fmm", 2048, 20.0)
    assert compare_pair(tmp_path, old, new) == 1
    out = capsys.readouterr().out
    assert "1 regressions" in out and "regression" in out


def test_compare_change_inside_noise_band_is_not_a_regression(tmp_path: Path, capsys) -> None:
    old = timed("fmmformer", "fmm", 1024, 10.0, band=0.15)  # p80 = 11.5
    new = timed("fmmformer", "fmm", 1024, 12.0, band=0.15)  # p20 = 10.2: bands overlap
    assert compare_pair(tmp_path, old, new) == 0
    assert "1 within noise" in capsys.readouterr().out


def test_compare_verdict_needs_the_threshold_between_the_bands(tmp_path: Path, capsys) -> None:
    """Medians 10% apart but bands (each +-5%) only 0.7% apart: both runs' spread leaves
    room for a 5% threshold to be noise, so it is not a regression; at 2% threshold it is
    still not (0.7% < 2%); a 20% change with the same bands is."""
    old = timed("fmmformer", "fmm", 1024, 10.0, band=0.05)   # p80 10.5
    new = timed("fmmformer", "fmm", 1024, 11.0, band=0.03)   # p20 10.67
    assert compare_pair(tmp_path / "a", old, new) == 0
    assert "1 within noise" in capsys.readouterr().out
    assert compare_pair(tmp_path / "b", old, new, "--threshold", "2%") == 0
    worse = timed("fmmformer", "fmm", 1024, 12.0, band=0.03)  # p20 11.64 > 10.5 * 1.05
    assert compare_pair(tmp_path / "c", old, worse) == 1


def test_compare_threshold(tmp_path: Path) -> None:
    old = timed("fmmformer", "fmm", 1024, 10.0, band=0.001)
    new = timed("fmmformer", "fmm", 1024, 10.3, band=0.001)  # +3%, beyond the tight band
    assert compare_pair(tmp_path / "a", old, new) == 0  # default 5%
    assert compare_pair(tmp_path / "b", old, new, "--threshold", "2%") == 1
    assert compare_pair(tmp_path / "c", old, new, "--threshold", "0.02") == 1


def test_compare_improvement_and_higher_is_better_metric(tmp_path: Path) -> None:
    old = timed("fmmformer", "fmm", 1024, 10.0) + [row("fmmformer", "fmm", 1024, 100.0,
                                                       metric="tflops")]
    new = timed("fmmformer", "fmm", 1024, 5.0) + [row("fmmformer", "fmm", 1024, 50.0,
                                                      metric="tflops")]
    assert compare_pair(tmp_path / "a", old, new) == 0  # faster is fine
    assert compare_pair(tmp_path / "b", old, new, "--metric", "tflops") == 1  # fewer TFLOP/s
    assert compare_pair(tmp_path / "c", new, old, "--metric", "tflops") == 0


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_compare_metric_without_a_band_is_judged_on_its_values(tmp_path: Path, capsys) -> None:
    """Memory has no p20/p80: a 20% larger peak is a regression, with no noise verdict and
    no warning about the missing band."""
    old = [row("fmmformer", "fmm", 1024, 100.0, suite="memory", metric="peak_mem_mib")]
    new = [row("fmmformer", "fmm", 1024, 120.0, suite="memory", metric="peak_mem_mib")]
    assert compare_pair(tmp_path, old, new, "--metric", "peak_mem_mib") == 1
    assert "1 regressions" in capsys.readouterr().out


def test_compare_newly_failing_case_and_one_sided_cases(tmp_path: Path, capsys) -> None:
    old = timed("fmmformer", "fmm", 1024, 10.0) + timed("window", "window", 1024, 1.0)
    new = [row("fmmformer", "fmm", 1024, status="error", reason="boom")]
    new += timed("window", "window", 1024, 1.0) + timed("window", "window", 2048, 2.0)
    assert compare_pair(tmp_path, old, new) == 1
    out = capsys.readouterr().out
    assert "status changes" in out and "boom" in out and "only in the new run" in out


def test_compare_warns_on_environment_and_prints_markdown(tmp_path: Path, capsys) -> None:
    rows = timed("fmmformer", "fmm", 1024, 10.0)
    assert compare_pair(tmp_path, rows, rows, "--markdown", new_meta={**META, "triton": "3.7"}) == 0
    cap = capsys.readouterr()
    assert "triton differs" in cap.err
    assert "| variant |" in cap.out and "|---|" in cap.out


def test_compare_warns_when_one_run_timed_cuda_graph_replays(tmp_path: Path, capsys) -> None:
    rows = timed("fmmformer", "fmm", 1024, 10.0)
    graph_meta = {**META, "config": {"cuda_graph": True}}
    assert compare_pair(tmp_path, rows, rows, new_meta=graph_meta) == 0
    assert "timing differs: calls as made (old) vs CUDA-graph replays (new)" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["not_csv", "missing_columns", "no_file", "no_common",
                                  "bad_metric", "bad_threshold", "bad_causal"])
def test_compare_malformed_or_mismatched_exits_2(tmp_path: Path, capsys, case: str) -> None:
    old = write_run(tmp_path / "old", timed("fmmformer", "fmm", 1024, 10.0))
    new = tmp_path / "new.csv"
    args: list[str] = []
    if case == "not_csv":
        new.write_bytes(b"\x00\xff garbage\n1,2\n1,2,3,4\n")
    elif case == "missing_columns":
        pd.DataFrame([row()]).drop(columns=["metric"]).to_csv(new, index=False)
    elif case == "no_common":
        write_run(tmp_path / "n", timed("fmmformer", "fmm", 1024, 10.0, head_dim=128))
        new = tmp_path / "n"
    elif case == "bad_causal":
        write_run(tmp_path / "n", timed("fmmformer", "fmm", 1024, 10.0, causal="maybe"))
        new = tmp_path / "n"
    else:
        new = old
        args = {"bad_metric": ["--metric", "peak_mem_mib"], "bad_threshold": ["--threshold", "x"],
                "no_file": []}[case]
        if case == "no_file":
            new = tmp_path / "absent.csv"
    assert main(["compare", str(old), str(new), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("run_bench.py: error:") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("column, cell, problem", [
    ("value", "fast", "is not a number"), ("value", "1.2.3", "is not a number"),
    ("status", "okay", "is not a status"), ("status", "", "is not a status"),
    ("seq_len", "1k", "is not a positive integer"), ("seq_len", "0", "is not a positive integer"),
    ("causal", "maybe", "is not True or False"),
])  # fmt: skip
def test_compare_rejects_a_cell_that_does_not_parse(tmp_path: Path, capsys, column: str,
                                                    cell: str, problem: str) -> None:
    rows = timed("fmmformer", "fmm", 1024, 10.0) + timed("fmmformer", "fmm", 2048, 20.0)
    old = write_run(tmp_path / "old", rows)
    rows[4][column] = cell  # the 5th data row: line 6 of the file
    new = write_run(tmp_path / "new", rows)
    assert main(["compare", str(old), str(new)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{new / 'results.csv'}:6: column '{column}': '{cell}' {problem}" in err


# ---------------------------------------------------------------- analysis


def claim_rows(naive_ms: float | None, fmm_ms: float, n: int = 2**14) -> list[dict]:
    naive = (row("softmax_naive", "softmax", n, naive_ms) if naive_ms is not None
             else row("softmax_naive", "softmax", n, status="oom", reason="CUDA OOM"))
    return [naive, row("softmax_sdpa", "softmax", n, 2.0, params='{"backend": "auto"}'),
            row("softmax_flex", "softmax", n, 3.0), row("fmmformer", "fmm", n, fmm_ms, params=FMM),
            row("fmmformer", "fmm", n, 0.5, params=FMM, metric="time_ms_p20"),  # ignored
            row("fmm_other", "fmm", n, 0.1, params=json.dumps({"bandwidth": 5, "kernels": 2}))]


def verdicts(rows: list[dict]) -> pd.DataFrame:
    table = claim_check(tidy(pd.DataFrame(rows, columns=list(COLUMNS))))
    return table[table["claim"] == "~10x faster at 2^14"].set_index("baseline")


@pytest.mark.parametrize("naive_ms, ratio, verdict", [(10.0, 10.0, "holds"), (5.0, 5.0, "holds"),
                                                      (4.0, 4.0, "does not hold")])
def test_claim_check_arithmetic(naive_ms: float, ratio: float, verdict: str) -> None:
    table = verdicts(claim_rows(naive_ms, 1.0))
    assert list(table["fmm variant"].unique()) == ["fmmformer"]  # only rank 3 + band 30
    naive = table.loc["softmax_naive"]
    assert naive["measured (x)"] == pytest.approx(ratio) and naive["verdict"] == verdict
    best = table.loc["best exact (softmax_sdpa)"]  # 2 ms beats naive and flex's 3 ms
    assert best["measured (x)"] == pytest.approx(2.0) and best["verdict"] == "does not hold"


def test_claim_check_baseline_oom_and_not_measured() -> None:
    assert verdicts(claim_rows(None, 1.0)).loc["softmax_naive", "verdict"] == "baseline OOM"
    rows = claim_rows(10.0, 1.0)
    rows[3] = row("fmmformer", "fmm", 2**14, params=FMM, status="error", reason="boom")
    assert (verdicts(rows)["verdict"] == "not measured").all()
    table = claim_check(tidy(pd.DataFrame(claim_rows(10.0, 1.0), columns=list(COLUMNS))))
    memory = table[table["claim"].str.contains("memory")]  # no memory rows: one line says so
    assert memory[["verdict", "note"]].values.tolist() == [["not measured",
                                                            "no memory rows at N=65536"]]


def test_best_exact_oom_when_every_softmax_ooms() -> None:
    rows = [row(v, "softmax", 2**14, status="oom") for v in ("softmax_naive", "softmax_sdpa")]
    rows.append(row("fmmformer", "fmm", 2**14, 1.0, params=FMM))
    assert (verdicts(rows)["verdict"] == "baseline OOM").all()


def test_slope_of_known_power_law() -> None:
    lengths = np.array([1024, 2048, 4096, 8192])
    assert fit_slope(lengths, 3.0 * lengths**1.5) == pytest.approx(1.5)
    rows = [row("fmmformer", "fmm", n, 1e-3 * n**1.5) for n in lengths]
    rows.append(row("fmmformer", "fmm", 512, 100.0))  # launch-bound point, excluded below
    rows += [row("fmmformer", "fmm", n, 2e-4 * n**2, suite="memory", metric="peak_mem_mib")
             for n in lengths]
    fits = slopes(tidy(pd.DataFrame(rows, columns=list(COLUMNS))), fit_from=1024)
    fits = fits.set_index("quantity")
    assert fits.loc["time", "slope"] == pytest.approx(1.5)
    assert fits.loc["memory", "slope"] == pytest.approx(2.0)
    assert (fits.loc["time", "from_len"], fits.loc["time", "to_len"]) == (1024, 8192)


def test_crossover() -> None:
    at, est, _ = crossover([1024, 2048, 4096], [0.5, 2.0, 4.0])
    assert at == 2048 and est == pytest.approx(2**10.5)
    at, est, note = crossover([1024, 2048, 4096], [2.0, 0.5, 3.0])  # must stay faster
    assert at == 4096
    assert math.isnan(crossover([1024, 2048], [0.5, 0.9])[0])
    assert crossover([1024, 2048], [0.5, math.inf])[2] == "baseline OOM from here"
    rows = [row("softmax_naive", "softmax", n, 5e-7 * n**2) for n in (1024, 2048, 4096)]
    rows += [row("fmmformer", "fmm", n, 1e-3 * n, params=FMM) for n in (1024, 2048, 4096)]
    table = crossovers(tidy(pd.DataFrame(rows, columns=list(COLUMNS))))
    naive = table[table["baseline"] == "softmax_naive"].iloc[0]
    assert naive["crossover"] == 2048 and naive["estimate"] == pytest.approx(2000)


def test_tidy_keeps_the_last_duplicate() -> None:
    df = tidy(pd.DataFrame([row(value=1.0), row(value=2.0)], columns=list(COLUMNS)))
    assert df["value"].tolist() == [2.0]
    with pytest.raises(ResultsError):
        tidy(pd.DataFrame([row(seq_len="long")], columns=list(COLUMNS)))


# ---------------------------------------------------------------- report / README


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo,
                   check=True, capture_output=True)


def committed_repo(root: Path, ignore: str = "") -> tuple[Path, Path]:
    """A git repository with a README (markers) and one committed run under results/run."""
    run = write_run(root / "results" / "run", sweep_rows(("fwd",), (False,)))
    readme = root / "README.md"
    readme.write_text(f"# top\n\n{START}\nstale\n{END}\n\n## Tests\nkeep me\n")
    (root / ".gitignore").write_text(ignore)
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "run")
    return run, readme


def test_report_rewrites_readme_between_markers(tmp_path: Path, capsys) -> None:
    run, readme = committed_repo(tmp_path)
    (run / "targets.md").write_text("| target | value |\n|---|---|\n| fmm fwd | 1 ms |\n")
    assert main(["report", str(run), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# top\n\n" + START) and text.endswith(END + "\n\n## Tests\nkeep me\n")
    assert "stale" not in text and "[fmmformer](results/run/fmmformer.md)" in text
    assert "](results/run/plots/scaling-cuda-bf16-b1-h2-d64.png)" in text
    assert "| N=8192 | time (ms) fwd, non-causal | memory (MiB) fwd, non-causal |" in text
    study = (run / "fmmformer.md").read_text()
    assert "| fmm fwd | 1 ms |" in study  # the run's targets.md, inside the study's answer
    assert "| claim | fmm variant | baseline |" in study and "| not measured |" in study
    out = capsys.readouterr().out
    assert "Claim check" in out and "slope" in out and "Crossover" in out
    again = readme.read_text()
    assert main(["report", str(run), "--readme", str(readme)]) == 0
    assert readme.read_text() == again  # regenerating is idempotent


def test_report_refuses_a_readme_whose_results_markers_enclose_another_section(
        tmp_path: Path, capsys) -> None:
    run, readme = committed_repo(tmp_path)
    tasks = "<!-- tasks:start -->\n<!-- tasks:end -->\n"
    readme.write_text(f"# top\n\n{START}\n## Trained tasks\n{tasks}{END}\n")
    before = readme.read_text()
    assert main(["report", str(run), "--readme", str(readme)]) == 2
    err = capsys.readouterr().err
    assert "<!-- tasks:start --> lies between" in err and err.count("\n") == 1
    assert readme.read_text() == before


def test_the_readme_generated_sections_do_not_nest() -> None:
    """Each generated part of this repository's README can be rewritten without deleting
    another (the results, quality and tasks markers)."""
    readme = Path(__file__).resolve().parent.parent / "README.md"
    for name in ("results", "quality", "tasks"):
        marker_span(readme, (f"<!-- {name}:start -->", f"<!-- {name}:end -->"))


@pytest.mark.parametrize("case", ["outside", "untracked", "modified", "ignored_plots"])
def test_report_readme_refuses_runs_that_are_not_committed(tmp_path: Path, capsys,
                                                           case: str) -> None:
    run, readme = committed_repo(tmp_path / "repo", "results/run/plots/\n"
                                 if case == "ignored_plots" else "")
    before = readme.read_text()
    if case == "outside":
        run = write_run(tmp_path / "elsewhere", sweep_rows(("fwd",), (False,)))
    elif case == "untracked":
        run = write_run(tmp_path / "repo" / "results" / "runs" / "new", sweep_rows(("fwd",)))
    elif case == "modified":
        with open(run / "results.csv", "a") as f:
            f.write("r1,x,fmm,{},{},time,fwd,1,2,1024,64,bf16,False,cuda,randn,,time_ms,1.0,ms,ok,\n")
    assert main(["report", str(run), "--readme", str(readme)]) == 2
    err = capsys.readouterr().err
    expected = {"outside": "is outside the repository", "untracked": "is not committed",
                "modified": "has uncommitted changes", "ignored_plots": "is ignored by git"}[case]
    assert err.count("\n") == 1 and expected in err and "committed results" in err
    assert readme.read_text() == before and not (run / "plots").exists()


def test_report_errors_exit_2(tmp_path: Path, capsys) -> None:
    run = write_run(tmp_path / "run", sweep_rows())
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    assert main(["report", str(run), "--readme", str(readme)]) == 2
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert main(["frobnicate"]) == 2
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 4 and "Traceback" not in err


def test_load_run_accepts_csv_and_directory(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", timed("fmmformer", "fmm", 1024, 1.0))
    a, b = load_run(run), load_run(run / "results.csv")
    assert a.meta == b.meta == META and a.dir == b.dir == run and a.name == "r1"


# ---------------------------------------------------------------- figure legibility


def visible_ticklabels(fig, ax, axis: str = "x") -> list:
    """Window extents of the tick labels matplotlib actually draws on `axis`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    ticks = getattr(ax, f"get_{axis}axis")().get_major_ticks() + \
        getattr(ax, f"get_{axis}axis")().get_minor_ticks()
    lo, hi = sorted(ax.get_xlim() if axis == "x" else ax.get_ylim())
    boxes = []
    for tick in ticks:
        label = tick.label1
        if label.get_visible() and label.get_text() and lo <= tick.get_loc() <= hi:
            boxes.append(label.get_window_extent(renderer))
    return boxes


@pytest.mark.parametrize("spread", [(0.02, 0.15), (0.12, 0.9), (0.9, 1.4), (0.01, 400.0)])
def test_accuracy_figure_x_tick_labels_do_not_overlap(spread) -> None:
    lo, hi = spread
    rows = []
    for i, ms in enumerate(np.geomspace(lo, hi, 6)):
        name = f"v{i}"
        rows += timed(name, "linear", 4096, float(ms))
        rows.append(row(name, "linear", 4096, 0.1 * (i + 1), suite="accuracy",
                        metric="rel_err_vs_softmax"))
    fig = accuracy_figure(tidy(pd.DataFrame(rows, columns=list(COLUMNS))), "t")
    for ax in fig.axes:
        boxes = visible_ticklabels(fig, ax)
        assert len(boxes) >= 2
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert not a.overlaps(b), (spread, a, b)


def test_scaling_legend_lists_only_variants_with_data() -> None:
    rows = sweep_rows(("fwd",), (False,))
    rows += [row("softmax_flex", "softmax", n, status="skipped", reason="cuda only")
             for n in (1024, 2048)]
    rows += [row("broken", "fmm", 1024, status="error", reason="boom")]
    fig = scaling_figure(tidy(pd.DataFrame(rows, columns=list(COLUMNS))), "t")
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert "softmax_flex" not in labels and "broken" not in labels
    assert {"softmax_naive", "softmax_sdpa", "fmmformer"} <= set(labels)


def test_a_study_plugs_its_tables_and_command_into_the_reports(tmp_path: Path, capsys) -> None:
    from harness.reports.study import Section, register_study, unregister_study

    def commands(sub):
        sub.add_parser("fastest").set_defaults(func=lambda args: print("fastest: ok") or 0)

    @register_study("toy", commands=commands)
    def sections(run):
        ok = run.df[(run.df.metric == "time_ms") & (run.df.status == "ok")]
        return [Section("Fastest", ok.nsmallest(1, "value")[["variant", "value"]])]

    try:
        run = write_run(tmp_path / "run", sweep_rows(("fwd",), (False,)))
        assert main(["report", str(run)]) == 0
        df = load_run(run).df
        best = df[df.metric == "time_ms"].nsmallest(1, "value").variant.iloc[0]
        assert "Fastest" in capsys.readouterr().out
        assert f"| {best} |" in (run / "toy.md").read_text()
        assert main(["fastest"]) == 0 and "fastest: ok" in capsys.readouterr().out
    finally:
        unregister_study("toy")


def test_the_harness_imports_no_study_and_holds_no_paper_claim() -> None:
    repo = Path(__file__).resolve().parent.parent
    studies = {module: sorted(t for t in targets if t.split(".")[0] == "studies")
               for module, targets in import_graph(repo).items()
               if module.split(".")[0] == "harness"}
    assert {module: found for module, found in studies.items() if found} == {}
    source = "\n".join(p.read_text() for p in (repo / "harness").rglob("*.py"))
    low_rank = ("CLAIM_K", "CLAIM_RANK", "r <= 5", "band_k", "lowrank")
    trained_tasks = ("CLAIMS", "claim_check", "Zoology", "WikiText", "enwik8", "Long Range Arena")
    for paper in low_rank + trained_tasks:
        assert paper not in source, paper


def test_best_exact_is_the_fastest_softmax_kernel_that_ran_and_passed_accuracy() -> None:
    """A faster exact peer (flash-attn) becomes the best exact kernel where it ran; where it
    was skipped, or where its accuracy rows failed, the next fastest is."""
    n = 2**14
    rows = claim_rows(10.0, 1.0)
    rows.append(row("softmax_flash_attn", "softmax", n, 1.5))
    assert verdicts(rows).index.tolist()[1] == "best exact (softmax_flash_attn)"
    skipped = [*claim_rows(10.0, 1.0), row("softmax_flash_attn", "softmax", n, status="skipped",
                                            reason="flash-attn needs CUDA")]
    assert "best exact (softmax_sdpa)" in verdicts(skipped).index
    for status in ("inexact", "error"):
        wrong = [*rows, row("softmax_flash_attn", "softmax", n, 30.0, suite="accuracy",
                            metric="floor_ratio", status=status, reason="dq over its floor")]
        assert "best exact (softmax_sdpa)" in verdicts(wrong).index


# ---------------------------------------------------------------- compare: status and missing


def floor_ratios(value: float, status: str = "ok") -> list[dict]:
    """One accuracy case's floor_ratio row (an `inexact` row keeps its value)."""
    r = row("fmmformer", "fmm", 1024, suite="accuracy", metric="floor_ratio", status=status)
    return [{**r, "value": value}]


@pytest.mark.parametrize("status", ["timeout", "inexact"])
def test_compare_ok_to_timeout_or_inexact_is_newly_failing(tmp_path: Path, capsys,
                                                           status: str) -> None:
    old = floor_ratios(1.0)
    new = floor_ratios(50.0 if status == "inexact" else None, status)
    assert compare_pair(tmp_path, old, new, "--metric", "floor_ratio") == 1
    assert "1 newly failing" in capsys.readouterr().out


def test_compare_judges_inexact_values_and_ignores_skipped(tmp_path: Path, capsys) -> None:
    old = floor_ratios(3.0, "inexact")
    assert compare_pair(tmp_path / "a", old, floor_ratios(30.0, "inexact"),
                        "--metric", "floor_ratio") == 1
    assert "1 regressions" in capsys.readouterr().out
    assert compare_pair(tmp_path / "b", floor_ratios(1.0), floor_ratios(None, "skipped"),
                        "--metric", "floor_ratio") == 0


def test_compare_failure_row_of_another_metric_is_a_status_change(tmp_path: Path, capsys) -> None:
    """A failed case has one row of its suite's primary metric (time_ms): compared on tflops
    it is newly failing, not missing."""
    old = timed("fmmformer", "fmm", 1024, 10.0) + [row("fmmformer", "fmm", 1024, 5.0,
                                                       metric="tflops")]
    new = [row("fmmformer", "fmm", 1024, status="timeout", reason="slow")]
    new += timed("window", "window", 1024, 1.0) + [row("window", "window", 1024, 5.0,
                                                       metric="tflops")]
    old += new[1:]
    assert compare_pair(tmp_path, old, new, "--metric", "tflops") == 1
    out = capsys.readouterr().out
    assert "1 newly failing" in out and "missing" not in out


def test_compare_case_missing_from_the_new_run_fails_unless_allowed(tmp_path: Path,
                                                                    capsys) -> None:
    old = timed("fmmformer", "fmm", 1024, 10.0) + timed("window", "window", 1024, 1.0)
    new = timed("fmmformer", "fmm", 1024, 10.0)
    assert compare_pair(tmp_path / "a", old, new) == 1
    assert "1 missing from the new run" in capsys.readouterr().out
    assert compare_pair(tmp_path / "b", old, new, "--allow-missing") == 0
    assert "1 missing from the new run (allowed)" in capsys.readouterr().out


# ---------------------------------------------------------------- input sources kept apart


def two_sources() -> pd.DataFrame:
    """The same case on randn (time ~ N) and minilm (time ~ N^2) inputs."""
    rows = [row("fmmformer", "fmm", n, 1e-3 * n, inputs="randn") for n in (1024, 2048, 4096)]
    rows += [row("fmmformer", "fmm", n, 1e-6 * n**2, inputs="minilm") for n in (1024, 2048, 4096)]
    return tidy(pd.DataFrame(rows, columns=list(COLUMNS)))


def test_slopes_and_figures_keep_input_sources_apart(tmp_path: Path) -> None:
    fits = slopes(two_sources()).set_index("inputs")["slope"]
    assert fits.to_dict() == pytest.approx({"randn": 1.0, "minilm": 2.0})
    run = write_run(tmp_path / "run", two_sources().to_dict("records"))
    assert main(["plot", str(run)]) == 0
    names = {p.name for p in (run / "plots").glob("scaling-*.png")}
    assert names == {"scaling-cuda-bf16-b1-h2-d64.png", "scaling-cuda-bf16-b1-h2-d64-minilm.png"}


def test_summary_has_a_column_per_input_source() -> None:
    from harness.summary import summary_tables

    table = summary_tables(two_sources())[0]
    cells = {c.header: list(c.cells) for c in table.columns}
    assert cells["minilm N=4096"] == ["16.8"] and cells["randn N=4096"] == ["4.1"]


def test_summary_cell_of_several_seeds_is_their_mean() -> None:
    from harness.summary import summary_tables

    rows = [row("fmmformer", "fmm", 64, acc, suite="task", mode="fwd_bwd", metric="accuracy",
                inputs="task:mqar", seed=seed) for seed, acc in ((0, 0.5), (1, 0.7), (2, 0.9))]
    tables = summary_tables(tidy(pd.DataFrame(rows, columns=list(COLUMNS))))
    assert list(tables[0].columns[-1].cells) == ["0.700 (mean of 3)"]
