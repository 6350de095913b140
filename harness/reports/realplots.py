"""Figures of real-attention quality, written as PNG and SVG: quality against speed, one point
per variant. matplotlib's object API only (no pyplot state)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from harness.reports.plots import save


def quality_vs_speed(points: pd.DataFrame, xlabel: str, title: str, path: Path) -> list[Path]:
    """One labelled point per variant: x = quality loss (log), y = time in ms (log)."""
    fig = Figure(figsize=(7.5, 5))
    ax = fig.subplots()
    for i, row in enumerate(points.itertuples(index=False)):
        ax.scatter(row.x, row.time_ms, color=f"C{i % 10}", zorder=3)
        ax.annotate(row.variant, (row.x, row.time_ms), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("time (ms)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    return save(fig, path, tight=True)
