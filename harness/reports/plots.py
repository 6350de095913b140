"""Figures from a run's results, written as PNG and SVG into the run's `plots/`.

The scaling figure follows the FMMformer paper's Figure 6: time and peak memory against
sequence length, log-log, one line per variant. Uses matplotlib's object API (no pyplot), so
nothing here touches the global backend; PNG renders with Agg.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogFormatterSciNotation, LogLocator, NullFormatter
from matplotlib.transforms import blended_transform_factory

from harness.registry import family_rank
from harness.reports.data import (
    BEST, CASE_COLS, CONFIG, FLOOR, RANDN, Run, baseline_values, config_name, is_floor,
    ok_values, scaling_metrics, variant_order,
)  # fmt: skip
from harness.suite import MODES, find_metric, get_suite

MARKERS = "osD^v<>ph*"  # one per family, in the registry's order
GUIDE = "0.35"  # grey of the O(N), O(N^2) guide lines
Panel = tuple[str, bool]  # (mode, causal)


def styles(df: pd.DataFrame) -> dict[str, dict]:
    """Line style per variant label: a colour each, a marker per family, stable across plots."""
    families = df.drop_duplicates("variant").set_index("variant")["family"]
    colors = mpl.colormaps["tab10" if df["variant"].nunique() <= 10 else "tab20"].colors
    return {
        v: {"color": colors[i % len(colors)], "marker": MARKERS[family_rank(families.get(v, "")) % len(MARKERS)]}
        for i, v in enumerate(variant_order(df))
    }


def only(style: dict[str, dict], df: pd.DataFrame) -> dict[str, dict]:
    """The styles of the variants that have something to draw in `df`: an ok value, or an
    OOM mark (what a legend should list; skipped and failed variants draw nothing)."""
    drawn = (df["status"] == "ok") & df["value"].notna() | (df["status"] == "oom")
    present = set(df.loc[drawn, "variant"])
    return {v: s for v, s in style.items() if v in present}


def panels_of(df: pd.DataFrame) -> list[Panel]:
    """The (mode, causal) panels present in `df`, in a fixed order."""
    present = set(df[["mode", "causal"]].itertuples(index=False, name=None))
    order = [(m, c) for m in (*MODES, *sorted(set(df["mode"]) - set(MODES))) for c in (False, True)]
    return [p for p in order if p in present]


def panel_title(panel: Panel) -> str:
    """e.g. 'fwd_bwd, causal'."""
    return f"{panel[0]}, {'causal' if panel[1] else 'non-causal'}"


def in_panel(df: pd.DataFrame, panel: Panel) -> pd.DataFrame:
    """The rows of one (mode, causal) panel."""
    return df[(df["mode"] == panel[0]) & (df["causal"] == panel[1])]


def log2_x(ax: Axes, label: bool = True) -> None:
    """Log-2 length axis with 2^k tick labels (lengths are powers of two in the presets)."""
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(LogFormatterSciNotation(base=2))
    if label:
        ax.set_xlabel("sequence length N")


def sparse_log_ticks(ax: Axes, min_ticks: int = 2) -> None:
    """Label a log x axis with plain numbers at 1 per decade, else 1-2-5, else 1..9 per decade:
    the coarsest of these that puts `min_ticks` labels inside the current limits. Minor ticks
    stay unlabelled (matplotlib's own labels of minor ticks collide on short ranges)."""
    lo, hi = sorted(ax.get_xlim())
    for subs in ((1.0,), (1.0, 2.0, 5.0), tuple(float(i) for i in range(1, 10))):
        locator = LogLocator(base=10, subs=subs)
        inside = [t for t in locator.tick_values(lo, hi) if lo <= t <= hi]
        if len(inside) >= min_ticks:
            break
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(lo, hi)


def no_data(ax: Axes) -> None:
    """Say so in an empty panel rather than leave it blank."""
    ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="0.5")


def draw_lines(ax: Axes, rows: pd.DataFrame, suite: str, style: dict[str, dict]) -> bool:
    """One line per variant of ok points; an x labelled OOM where a line ends by OOM.

    The x sits at the first OOM length, at the height of the line's last ok point (or at
    the bottom edge when the variant never ran). Returns whether anything was drawn.
    """
    metric = scaling_metrics()[suite]
    ok = ok_values(rows, suite, metric)
    ok = ok[ok["value"] > 0]  # log axis; a zero peak means "below measurement resolution"
    oom = rows[(rows["metric"] == metric) & (rows["status"] == "oom")]
    drawn = False
    for variant, st in style.items():
        pts = ok[ok["variant"] == variant].sort_values("seq_len")
        if not pts.empty:
            ax.plot(pts["seq_len"], pts["value"], color=st["color"],
                    marker=st["marker"], markersize=4, linewidth=1.5)
            drawn = True
        ooms = oom.loc[oom["variant"] == variant, "seq_len"]
        if not ooms.empty:
            n = ooms.min()
            before = pts[pts["seq_len"] < n]
            if before.empty:
                y, transform = 0.03, blended_transform_factory(ax.transData, ax.transAxes)
            else:
                y, transform = before["value"].iloc[-1], ax.transData
            ax.plot([n], [y], marker="x", color=st["color"], markersize=9, mew=2,
                    linestyle="none", transform=transform)
            ax.annotate("OOM", (n, y), xycoords=transform, xytext=(0, 7), ha="center",
                        textcoords="offset points", fontsize=7, color=st["color"])
            drawn = True
    return drawn


def draw_guides(ax: Axes, rows: pd.DataFrame, suite: str) -> None:
    """O(N) and O(N^2) guide lines through the median value at the smallest ok length."""
    ok = ok_values(rows, suite, scaling_metrics()[suite])
    ok = ok[ok["value"] > 0]
    if ok["seq_len"].nunique() < 2:
        return
    n0 = ok["seq_len"].min()
    y0 = float(ok.loc[ok["seq_len"] == n0, "value"].median())
    xs = np.array(sorted(ok["seq_len"].unique()), dtype=float)
    limits = ax.get_ylim()  # guides must not stretch the data's range
    for power, ls in ((1, "--"), (2, ":")):
        ax.plot(xs, y0 * (xs / n0) ** power, color=GUIDE, linestyle=ls, linewidth=1, zorder=0)
    ax.set_ylim(limits)


def scaling_figure(df: pd.DataFrame, title: str, style: dict | None = None) -> Figure | None:
    """Time (top row) and peak memory (bottom row) vs N, one column per (mode, causal) panel;
    a run of one suite (e.g. time alone) gets that row only.

    `df` holds the rows of one CONFIG; variants that ran out of memory end in an OOM mark.
    None when there are no time or memory rows.
    """
    metrics = scaling_metrics()
    rows = df[df["suite"].isin(list(metrics))]
    if rows.empty:
        return None
    panels = panels_of(rows)
    suites = [suite for suite in metrics if (rows["suite"] == suite).any()]
    style = only(style or styles(df), rows)
    fig = Figure(figsize=(3.6 * len(panels) + 2.5, 3.0 * len(suites) + 0.5), layout="constrained")
    axes = fig.subplots(len(suites), len(panels), squeeze=False, sharex=True)
    for r, suite in enumerate(suites):
        for c, panel in enumerate(panels):
            ax = axes[r, c]
            sub = in_panel(rows[rows["suite"] == suite], panel)
            log2_x(ax, label=r == len(suites) - 1)
            ax.set_yscale("log")
            if draw_lines(ax, sub, suite, style):
                draw_guides(ax, sub, suite)
            else:
                no_data(ax)
            ax.grid(True, which="major", alpha=0.3)
            if r == 0:
                ax.set_title(panel_title(panel))
            if c == 0:
                ax.set_ylabel(get_suite(suite).primary_metric.axis_label)
    legend(fig, style, guides=True)
    fig.suptitle(title)
    return fig


def legend(fig: Figure, style: dict[str, dict], guides: bool = False) -> None:
    """One legend for the whole figure: the variants, then (scaling) guide lines and OOM mark."""
    handles = [Line2D([], [], color=s["color"], marker=s["marker"], label=v)
               for v, s in style.items()]
    if guides:
        handles += [Line2D([], [], color=GUIDE, linestyle="--", label="O(N)"),
                    Line2D([], [], color=GUIDE, linestyle=":", label="O(N^2)"),
                    Line2D([], [], color="0.3", marker="x", linestyle="none", label="OOM")]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)


def lines_figure(points: pd.DataFrame, style: dict[str, dict], title: str, ylabel: str,
                 log_y: bool = True) -> Figure:
    """One panel per (mode, causal): a line of `y` against N per variant in `points`."""
    panels, style = panels_of(points), only(style, points)
    fig = Figure(figsize=(3.6 * len(panels) + 2.5, 3.8), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, panel in zip(axes, panels):
        sub = in_panel(points, panel)
        for variant, st in style.items():
            pts = sub[sub["variant"] == variant].sort_values("seq_len")
            if not pts.empty:
                ax.plot(pts["seq_len"], pts["y"], color=st["color"], marker=st["marker"],
                        markersize=4)
        log2_x(ax)
        ax.set_yscale("log" if log_y else "linear")
        ax.grid(True, which="major", alpha=0.3)
        ax.set_title(panel_title(panel))
    axes[0].set_ylabel(ylabel)
    legend(fig, style)
    fig.suptitle(title)
    return fig


def speedup_figure(df: pd.DataFrame, title: str, baseline: str = BEST,
                   style: dict | None = None) -> Figure | None:
    """Speed-up (baseline time / variant time) per length, one panel per (mode, causal).

    `baseline` is a variant label or `BEST` (per case the fastest ok softmax-family variant);
    lengths where the baseline ran out of memory are named in the panel. None without data.
    """
    base = baseline_values(df, "time", "time_ms", baseline)
    times = ok_values(df, "time", "time_ms")
    joined = times.merge(base, on=list(CASE_COLS), suffixes=("", "_base"))
    joined = joined[joined["value_base"].notna() & (joined["variant"] != baseline)]
    if joined.empty:
        return None
    name = "best exact softmax" if baseline == BEST else baseline
    points = joined.assign(y=joined["value_base"] / joined["value"])
    fig = lines_figure(points, style or styles(df), title, f"speed-up vs {name} (x)")
    for ax, panel in zip(fig.axes, panels_of(points)):
        ax.axhline(1.0, color="0.3", linewidth=0.8)
        oom = in_panel(base[base["oom"]], panel)
        if not oom.empty:
            ax.text(0.02, 0.97, f"baseline OOM from N={oom['seq_len'].min()}",
                    transform=ax.transAxes, va="top", fontsize=7)
    return fig


def accuracy_length(df: pd.DataFrame) -> int | None:
    """The largest N with both an ok rel_err_vs_softmax and an ok time: the default length."""
    acc = set(ok_values(df, "accuracy", "rel_err_vs_softmax")["seq_len"])
    both = acc & set(ok_values(df, "time", "time_ms")["seq_len"])
    return max(both) if both else None


def accuracy_figure(df: pd.DataFrame, title: str, length: int | None = None,
                    style: dict | None = None) -> Figure | None:
    """Accuracy vs speed at one length: rel_err_vs_softmax against forward time, per causal flag.

    The dashed line is exact softmax's own low-precision error (the floor), when measured.
    None when nothing was measured in both suites at that length.
    """
    length = length or accuracy_length(df)
    acc = ok_values(df, "accuracy", "rel_err_vs_softmax")
    acc = acc[(acc["seq_len"] == length) & (acc["value"] > 0)]
    times = ok_values(df, "time", "time_ms")
    times = times[times["seq_len"] == length]
    mode = "fwd" if (times["mode"] == "fwd").any() else next(iter(times["mode"]), "fwd")
    keys = ["variant", "causal"]
    pts = acc[keys + ["value"]].merge(times.loc[times["mode"] == mode, keys + ["value"]],
                                      on=keys, suffixes=("_err", "_time"))
    if pts.empty:
        return None
    floor = df[is_floor(df) & (df["status"] == "ok") & (df["seq_len"] == length)
               & df["metric"].isin(["rel_err_vs_softmax", FLOOR])]
    style = style or styles(df)
    flags = sorted(pts["causal"].unique())
    fig = Figure(figsize=(5.0 * len(flags), 4.2), layout="constrained")
    for ax, causal in zip(fig.subplots(1, len(flags), squeeze=False)[0], flags):
        for p in pts[pts["causal"] == causal].itertuples(index=False):
            st = style.get(p.variant, {"color": "0.3", "marker": "o"})
            ax.scatter(p.value_time, p.value_err, color=st["color"], marker=st["marker"])
            ax.annotate(p.variant, (p.value_time, p.value_err), xytext=(4, 3),
                        textcoords="offset points", fontsize=7)
        ref = floor.loc[floor["causal"] == causal, "value"]
        if not ref.empty:
            y = float(ref.iloc[-1])
            ax.axhline(y, color="0.4", linestyle="--", linewidth=1)
            ax.annotate("softmax floor", (0.01, y), xycoords=("axes fraction", "data"),
                        xytext=(0, 3), textcoords="offset points", fontsize=7, color="0.4")
        ax.set_xscale("log")
        ax.set_yscale("log")
        sparse_log_ticks(ax)
        ax.grid(True, which="major", alpha=0.3)
        ax.set_xlabel(f"{mode} time (ms)")
        ax.set_ylabel("rel. error vs exact softmax")
        ax.set_title(f"N={length}, {'causal' if causal else 'non-causal'}")
    fig.suptitle(title)
    return fig


def roofline_figure(df: pd.DataFrame, title: str, style: dict | None = None) -> Figure | None:
    """Fraction of the roofline floor reached, per variant and length; None when not measured."""
    frac = ok_values(df, "time", "roofline_frac")
    if frac.empty:
        return None
    fig = lines_figure(frac.assign(y=frac["value"]), style or styles(df), title,
                       "fraction of roofline floor", log_y=False)
    fig.axes[0].set_ylim(0, max(1.0, float(frac["value"].max()) * 1.05))
    return fig


def save(fig: Figure, stem: Path, tight: bool = False) -> list[Path]:
    """Write `stem.png` and `stem.svg`; the SVG without a date or random ids (stable diffs).
    `tight`: cropped to the drawn area (labels placed outside the axes stay in)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    png, svg = stem.parent / f"{stem.name}.png", stem.parent / f"{stem.name}.svg"
    bbox = "tight" if tight else None
    with mpl.rc_context({"svg.hashsalt": "attnbench"}):
        fig.savefig(png, dpi=120, bbox_inches=bbox)
        fig.savefig(svg, metadata={"Date": None}, bbox_inches=bbox)
    return [png, svg]


def floor_figure(df: pd.DataFrame, title: str, style: dict | None = None) -> Figure | None:
    """Accuracy against the floor: each variant's `floor_ratio` (its error over the same
    reference math in its dtype; output for fwd, the worst gradient for bwd and fwd_bwd) vs N,
    one panel per (mode, causal), with the limit above which rows are flagged `inexact`.
    None when there are no such rows."""
    limit = getattr(find_metric("floor_ratio"), "limit", None)
    rows = df[(df["suite"] == "accuracy") & (df["metric"] == "floor_ratio")
              & df["status"].isin(["ok", "inexact"]) & df["value"].notna()]
    if rows.empty:
        return None
    panels = panels_of(rows)
    style = only(style or styles(df), rows)
    fig = Figure(figsize=(3.6 * len(panels) + 2.5, 3.5), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, panel in zip(axes, panels):
        sub = in_panel(rows, panel)
        log2_x(ax)
        ax.set_yscale("log")
        for variant, s in style.items():
            line = sub[sub["variant"] == variant].sort_values("seq_len")
            if not line.empty:
                ax.plot(line["seq_len"], line["value"], color=s["color"], marker=s["marker"])
        if limit is not None:
            ax.axhline(limit, color="0.3", linestyle="--", linewidth=1)
        ax.grid(True, which="major", alpha=0.3)
        ax.set_title(panel_title(panel))
    axes[0].set_ylabel("error / same-dtype floor")
    legend(fig, style)
    fig.suptitle(title)
    return fig


def figure_title(run: Run, config: tuple) -> str:
    """Run id, GPU (or device), dtype, shape and input source (unless randn): a figure must say
    where it was measured, and on what."""
    device, dtype, batch, heads, head_dim, inputs = config
    where = run.meta.get("gpu") or device
    source = "" if inputs == RANDN else f" · {inputs}"
    return f"{run.name} · {where} · {dtype} · B={batch} H={heads} D={head_dim}{source}"


def write_plots(run: Run, baseline: str = BEST, length: int | None = None) -> list[Path]:
    """Render every figure for every CONFIG of `run` into `run.dir / "plots"`.

    Files are `<kind>-<config>.png/.svg` with kind in scaling, speedup, accuracy, roofline,
    floor;
    figures without data are skipped. Returns the written paths.
    """
    out = run.dir / "plots"
    written: list[Path] = []
    for config, rows in run.df.groupby(list(CONFIG), sort=True):
        title, name, style = figure_title(run, config), config_name(config), styles(rows)
        figures = {  # one style per config: a variant keeps its colour in every figure
            "scaling": scaling_figure(rows, title, style),
            "speedup": speedup_figure(rows, title, baseline, style),
            "accuracy": accuracy_figure(rows, title, length, style),
            "roofline": roofline_figure(rows, title, style),
            "floor": floor_figure(rows, title, style),
        }
        for kind, fig in figures.items():
            if fig is not None:
                written += save(fig, out / f"{kind}-{name}")
    return written
