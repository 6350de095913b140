"""Reports of the task suite: the quality table (variant x task, mean +- std over seeds), the
quality-vs-speed plot and the learning curves of one run directory, with the sections the
registered studies add to it (`task_sections`, `harness.reports.study`).

    python run_bench.py tasks RUN_DIR [--readme README.md]

writes RUN_DIR/tasks.md and RUN_DIR/plots/tasks-*.png (and .svg); with `--readme`, the same
text replaces README's section between the `tasks` markers.
"""
from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from harness.reports.data import Run, load_run
from harness.reports.plots import save
from harness.reports.readme import ReadmeError, rewrite
from harness.reports.study import Section, figure_links, section_lines, study_sections
from harness.reports.tables import markdown_table
from harness.results import ResultsError
from harness.suite import get_suite, higher_is_better
from harness.usage import OneLineParser, UsageError, usage_error
from suites import load_builtin_suites
from suites.task import CURVES_DIR, curve_stem

MARKERS = ("<!-- tasks:start -->", "<!-- tasks:end -->")


def task_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The task suite's rows, with `task` (name) and `setting` (name and length) columns."""
    rows = df[df["suite"] == "task"].copy()
    rows["task"] = rows["inputs"].str.removeprefix("task:")
    rows["setting"] = rows["task"] + " N=" + rows["seq_len"].astype(str)
    return rows


def quality_metrics() -> list[str]:
    """The task suite's held-out scores: the metrics of its summary (accuracy, bpc)."""
    return [s.metric for s in get_suite("task").summary]


def seed_counts(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (setting, variant, family) that trained: the seeds that ended `ok` and the seeds run
    (`seeds`; a seed that failed counts, a variant skipped here does not)."""
    ran = rows[rows["status"] != "skipped"]
    keys = ["setting", "variant", "family"]
    out = ran.groupby(keys)["seed"].nunique().rename("seeds").reset_index()
    ok = ran[ran["status"] == "ok"].groupby(keys)["seed"].nunique()
    out["ok"] = [int(ok.get(tuple(k), 0)) for k in out[keys].itertuples(index=False)]
    return out


def scores(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (setting, variant): the task metric's mean, std and seed count over ok rows
    (`count`), the seeds run (`seeds`, failed ones included), and the mean attention time and
    training throughput."""
    ok = rows[rows["status"] == "ok"]
    quality = ok[ok["metric"].isin(quality_metrics())]
    out = quality.groupby(["task", "setting", "seq_len", "variant", "family", "metric"])[
        "value"].agg(["mean", "std", "count"]).reset_index()
    seeds = seed_counts(rows).set_index(["setting", "variant"])["seeds"]
    out["seeds"] = [seeds[(s, v)] for s, v in zip(out["setting"], out["variant"])]
    for metric in ("attn_fwd_bwd_ms", "train_tokens_per_s"):
        means = ok[ok["metric"] == metric].groupby(["setting", "variant"])["value"].mean()
        out[metric] = [means.get((s, v)) for s, v in zip(out["setting"], out["variant"])]
    return out


def cell(mean: float, std: float, count: int) -> str:
    spread = f" ± {std:.3f}" if count > 1 and std == std else ""
    return f"{mean:.3f}{spread}"


def quality_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Variant x setting: `mean ± std` of the task metric, or the status of failed runs."""
    s = scores(rows)
    table: dict[str, dict[str, str]] = {}
    for r in s.itertuples(index=False):
        table.setdefault(r.variant, {})[f"{r.setting} {r.metric}"] = cell(r.mean, r.std, r.count)
    columns = {}
    for r in rows.drop_duplicates(["setting"]).sort_values(["task", "seq_len"]).itertuples():
        metric = "bpc" if r.task == "charlm" else "accuracy"
        columns[r.setting] = f"{r.setting} {metric}"
    failed = rows[rows["status"] != "ok"]
    for r in failed.itertuples(index=False):
        entry = table.setdefault(r.variant, {})
        entry.setdefault(columns[r.setting], "")
        if r.status not in entry[columns[r.setting]]:
            entry[columns[r.setting]] += f" ({r.status})" if entry[columns[r.setting]] else r.status
    out = pd.DataFrame([{"variant": v, **{c: table[v].get(c, "") for c in columns.values()}}
                        for v in sorted(table)])
    return out


def plot_quality_vs_speed(rows: pd.DataFrame, path: Path) -> list[Path]:
    """The figure of `quality_vs_speed`, saved at `path` (none when nothing was timed)."""
    fig = quality_vs_speed(rows)
    return save(fig, path, tight=True) if fig is not None else []


def quality_vs_speed(rows: pd.DataFrame) -> Figure | None:
    """One panel per setting: task metric (mean, std bars) against the attention's forward
    plus backward time at that setting's shape."""
    s = scores(rows).dropna(subset=["attn_fwd_bwd_ms"])
    settings = sorted(s["setting"].unique())
    if not settings:
        return None
    fig = Figure(figsize=(4.2 * len(settings), 3.8))
    axes = fig.subplots(1, len(settings), squeeze=False)[0]
    for ax, setting in zip(axes, settings):
        part = s[s["setting"] == setting]
        for i, r in enumerate(part.itertuples(index=False)):
            ax.errorbar(r.attn_fwd_bwd_ms, r.mean, yerr=0 if r.std != r.std else r.std,
                        fmt="o", color=f"C{i % 10}", capsize=3)
            ax.annotate(r.variant, (r.attn_fwd_bwd_ms, r.mean), textcoords="offset points",
                        xytext=(4, 3), fontsize=7)
        ax.set_xscale("log")  # its minor ticks are labelled when the times span < a decade
        ax.set_xlabel("attention fwd+bwd at the task's shape (ms)")
        metric = part["metric"].iloc[0]
        ax.set_ylabel(f"{metric} ({'higher' if higher_is_better(metric) else 'lower'} is better)")
        ax.set_title(setting, fontsize=10)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def plot_curves(run_dir: Path, rows: pd.DataFrame, path: Path) -> list[Path]:
    """One panel per setting: training loss against tokens, one line per (variant, seed)."""
    curves = Path(run_dir) / CURVES_DIR
    settings = sorted(rows["setting"].unique())
    if not settings or not curves.is_dir():
        return []
    fig = Figure(figsize=(4.2 * len(settings), 3.6))
    axes = fig.subplots(1, len(settings), squeeze=False)[0]
    for ax, setting in zip(axes, settings):
        task, n = setting.split(" N=")
        for i, variant in enumerate(sorted(rows["variant"].unique())):
            stem = glob.escape(curve_stem(variant, task, int(n)))
            for j, f in enumerate(sorted(curves.glob(f"{stem}seed*.csv"))):
                c = pd.read_csv(f)
                ax.plot(c["tokens"], c["train_loss"], color=f"C{i % 10}", lw=0.8, alpha=0.8,
                        label=variant if j == 0 else None)
        ax.set_xlabel("training tokens")
        ax.set_ylabel("training loss (nats)")
        ax.set_title(setting, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, path, tight=True)


def report_text(run: Run, rows: pd.DataFrame, studies: Sequence[Section], figures: list[Path],
                base: Path) -> str:
    """Markdown: what ran, the quality table, the `studies`' sections, the figures (linked
    relative to the directory `base`)."""
    meta = run.meta
    where = meta.get("gpu") or meta.get("device") or "unknown device"
    seeds = rows["seed"].nunique()
    lines = [f"Run `{run.name}` on {where}, preset `{meta.get('preset', '?')}`, {seeds} seed(s)"
             + (f", git `{str(meta['git_sha'])[:10]}`" if meta.get("git_sha") else "") + ".",
             "", f"Measured with `{meta.get('command', '?')}`.", "",
             "**Quality** (held-out; mean ± std over seeds; `accuracy` higher is better, `bpc` "
             "bits per character lower is better):", "", markdown_table(quality_table(rows)), ""]
    for part in studies:
        lines += section_lines(part, base)
    for link in figure_links(tuple(figures), base):
        lines += [link, ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(run_dir: Path, readme: Path | None = None) -> str:
    """Write RUN_DIR/tasks.md and the plots (and README's section); returns the text."""
    run = load_run(run_dir)
    rows = task_rows(run.df)
    if rows.empty:
        raise ResultsError(f"{run_dir} has no task suite rows (run --suite task first)")
    plots = Path(run_dir) / "plots"
    figures = [p for p in (plot_quality_vs_speed(rows, plots / "tasks-quality-vs-speed")
                           + plot_curves(run_dir, rows, plots / "tasks-curves"))
               if p.suffix == ".png"]
    studies = study_sections(run, "task_sections")
    text = report_text(run, rows, studies, figures, Path(run_dir))
    (Path(run_dir) / "tasks.md").write_text(text)
    if readme is not None:
        rewrite(readme, report_text(run, rows, studies, figures, readme.parent), MARKERS)
    return text


def main(argv: list[str]) -> int:
    """`run_bench.py tasks RUN_DIR [--readme FILE]`; 2 with one line on bad input."""
    parser = OneLineParser(prog="run_bench.py tasks",
                           description="Reports of a task suite run.")
    parser.add_argument("run", type=Path, metavar="RUN_DIR")
    parser.add_argument("--readme", type=Path, help="rewrite this file's tasks section")
    load_builtin_suites()  # the task suite's metrics and their directions
    try:
        args = parser.parse_args(argv)
        print(write_report(args.run, args.readme))
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except (ResultsError, ReadmeError, UsageError) as exc:
        return usage_error(exc)
    return 0
