"""Reports of the task suite: the quality table (variant x task, mean +- std over seeds), the
claim check (the FMMformer and FMA papers' claims restated as orderings on these tasks), the
quality-vs-speed plot and the learning curves, from one run directory.

    python run_bench.py tasks RUN_DIR [--readme README.md]

writes RUN_DIR/tasks.md and RUN_DIR/plots/tasks-*.png (and .svg); with `--readme`, the same
text replaces README's section between the `tasks` markers.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from harness.reports.data import Run, load_run
from harness.reports.quality import rewrite_readme
from harness.reports.readme import ReadmeError
from harness.reports.realplots import save
from harness.reports.tables import markdown_table
from harness.results import ResultsError

MARKERS = ("<!-- tasks:start -->", "<!-- tasks:end -->")
HIGHER_IS_BETTER = {"accuracy": True, "bpc": False}
NOT_REPRODUCIBLE = (
    "The papers' absolute numbers (Long Range Arena accuracies, WikiText-103 perplexity, enwik8 "
    "bits per character) are not reproducible here: these are small models trained for a few "
    "million tokens on generated data and the Python standard library, so only the direction "
    "of each claim is tested."
)
# (claim, source, metric, task, ordering of families from best to worst)
CLAIMS = (
    ("bpc softmax <= fmmformer <= linear", "FMMformer: WikiText-103 perplexity 34.29 <= 36.11 "
     "<= 38.40", "bpc", "charlm", ("softmax", "fmm", "linear")),
    ("accuracy fmmformer >= linear", "FMMformer: LRA average above linear attention's", "accuracy",
     "listops", ("fmm", "linear")),
    ("accuracy fmmformer >= softmax", "FMMformer: LRA average 60.74 vs softmax 58.70",
     "accuracy", "listops", ("fmm", "softmax")),
    ("bpc fma <= fmmformer, linear, window", "FMA: beats other efficient methods on enwik8",
     "bpc", "charlm", ("multipole", ("fmm", "linear", "window"))),
    ("accuracy softmax >= linear", "Zoology: attention solves MQAR, linear attention does not",
     "accuracy", "mqar", ("softmax", "linear")),
)


def task_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The task suite's rows, with `task` (name) and `setting` (name and length) columns."""
    rows = df[df["suite"] == "task"].copy()
    rows["task"] = rows["inputs"].str.removeprefix("task:")
    rows["setting"] = rows["task"] + " N=" + rows["seq_len"].astype(str)
    return rows


def scores(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (setting, variant): the task metric's mean, std and seed count over ok rows, and
    the mean attention time and training throughput."""
    ok = rows[rows["status"] == "ok"]
    quality = ok[ok["metric"].isin(list(HIGHER_IS_BETTER))]
    out = quality.groupby(["task", "setting", "seq_len", "variant", "family", "metric"])[
        "value"].agg(["mean", "std", "count"]).reset_index()
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


def family_score(s: pd.DataFrame, setting: str, family: str, higher: bool):
    """(variant, mean, std) of the family's best variant in `setting`, or None."""
    rows = s[(s["setting"] == setting) & (s["family"] == family)]
    if rows.empty:
        return None
    best = rows.loc[rows["mean"].idxmax() if higher else rows["mean"].idxmin()]
    return best["variant"], best["mean"], best["std"]


def claim_check(rows: pd.DataFrame) -> pd.DataFrame:
    """Each claim at each setting of its task: the measured values and holds / does not hold
    (on the means over seeds; a family's best variant stands for it)."""
    s = scores(rows)
    out = []
    for claim, source, metric, task, order in CLAIMS:
        higher = HIGHER_IS_BETTER[metric]
        settings = sorted(s[s["task"] == task]["setting"].unique())
        if not settings:
            out.append({"claim": claim, "setting": task, "source": source,
                        "measured": "not measured (task not in this run)", "verdict": "n/a"})
        for setting in settings:
            groups = [g if isinstance(g, tuple) else (g,) for g in order]
            found = [[family_score(s, setting, f, higher) for f in g] for g in groups]
            found = [[x for x in g if x] for g in found]
            if any(not g for g in found):
                out.append({"claim": claim, "setting": setting, "source": source,
                            "measured": "not measured (a family is missing)", "verdict": "n/a"})
                continue
            holds = all(_better_or_equal(a[1], b[1], higher)
                        for first, second in zip(found, found[1:]) for a in first for b in second)
            measured = "; ".join(f"{v} {m:.3f}" + (f" ± {sd:.3f}" if sd == sd else "")
                                 for g in found for v, m, sd in g)
            out.append({"claim": claim, "setting": setting, "source": source,
                        "measured": measured, "verdict": "holds" if holds else "does not hold"})
    return pd.DataFrame(out, columns=["claim", "setting", "source", "measured", "verdict"])


def _better_or_equal(a: float, b: float, higher: bool) -> bool:
    return a >= b if higher else a <= b


def plot_quality_vs_speed(rows: pd.DataFrame, path: Path) -> list[Path]:
    """One panel per setting: task metric (mean, std bars) against the attention's forward
    plus backward time at that setting's shape."""
    s = scores(rows).dropna(subset=["attn_fwd_bwd_ms"])
    settings = sorted(s["setting"].unique())
    if not settings:
        return []
    fig = Figure(figsize=(4.2 * len(settings), 3.8))
    axes = fig.subplots(1, len(settings), squeeze=False)[0]
    for ax, setting in zip(axes, settings):
        part = s[s["setting"] == setting]
        for i, r in enumerate(part.itertuples(index=False)):
            ax.errorbar(r.attn_fwd_bwd_ms, r.mean, yerr=0 if r.std != r.std else r.std,
                        fmt="o", color=f"C{i % 10}", capsize=3)
            ax.annotate(r.variant, (r.attn_fwd_bwd_ms, r.mean), textcoords="offset points",
                        xytext=(4, 3), fontsize=7)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("attention fwd+bwd at the task's shape (ms)")
        ax.set_ylabel(part["metric"].iloc[0] + (" (higher is better)" if HIGHER_IS_BETTER[
            part["metric"].iloc[0]] else " (lower is better)"))
        ax.set_title(setting, fontsize=10)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return save(fig, path)


def plot_curves(run_dir: Path, rows: pd.DataFrame, path: Path) -> list[Path]:
    """One panel per setting: training loss against tokens, one line per (variant, seed)."""
    curves = Path(run_dir) / "curves"
    settings = sorted(rows["setting"].unique())
    if not settings or not curves.is_dir():
        return []
    fig = Figure(figsize=(4.2 * len(settings), 3.6))
    axes = fig.subplots(1, len(settings), squeeze=False)[0]
    for ax, setting in zip(axes, settings):
        task, n = setting.split(" N=")
        for i, variant in enumerate(sorted(rows["variant"].unique())):
            for j, f in enumerate(sorted(curves.glob(f"{variant}_{task}_N{n}_seed*.csv"))):
                c = pd.read_csv(f)
                ax.plot(c["tokens"], c["train_loss"], color=f"C{i % 10}", lw=0.8, alpha=0.8,
                        label=variant if j == 0 else None)
        ax.set_xlabel("training tokens")
        ax.set_ylabel("training loss (nats)")
        ax.set_title(setting, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, path)


def report_text(run: Run, rows: pd.DataFrame, figures: list[Path], base: Path) -> str:
    """Markdown: what ran, the quality table, the claim check, the figures."""
    meta = run.meta
    where = meta.get("gpu") or meta.get("device") or "unknown device"
    seeds = rows["seed"].nunique()
    lines = [f"Run `{run.name}` on {where}, preset `{meta.get('preset', '?')}`, {seeds} seed(s)"
             + (f", git `{str(meta['git_sha'])[:10]}`" if meta.get("git_sha") else "") + ".",
             "", f"Measured with `{meta.get('command', '?')}`.", "",
             "**Quality** (held-out; mean ± std over seeds; `accuracy` higher is better, `bpc` "
             "bits per character lower is better):", "", markdown_table(quality_table(rows)), "",
             "**Claim check** (means over seeds; a family's best variant stands for it). "
             + NOT_REPRODUCIBLE, "", markdown_table(claim_check(rows)), ""]
    for png in figures:
        rel = Path(os.path.relpath(png, base)).as_posix()
        lines += [f"![{png.stem}]({rel})", ""]
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
    (Path(run_dir) / "tasks.md").write_text(report_text(run, rows, figures, Path(run_dir)))
    if readme is not None:
        rewrite_readme(readme, report_text(run, rows, figures, readme.parent), MARKERS)
    return report_text(run, rows, figures, Path(run_dir))


class _OneLine(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str]) -> int:
    """`run_bench.py tasks RUN_DIR [--readme FILE]`; 2 with one line on bad input."""
    parser = _OneLine(prog="run_bench.py tasks", description="Reports of a task suite run.")
    parser.add_argument("run", type=Path, metavar="RUN_DIR")
    parser.add_argument("--readme", type=Path, help="rewrite this file's tasks section")
    args = parser.parse_args(argv)
    try:
        print(write_report(args.run, args.readme))
    except (ResultsError, ReadmeError) as exc:
        print(f"run_bench.py tasks: error: {exc}", file=sys.stderr)
        return 2
    return 0
