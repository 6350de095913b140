"""Figures of the low-rank claim, written as PNG and SVG: an attention map with its band and
residual (the FMMformer paper's Figure 1), the residual rank histogram over heads, and the
singular-value decay of the residuals. matplotlib's object API only (no pyplot state)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from harness.reports.plots import save
from studies.fmmformer.lowrank import band_mask


def map_band_residual(a: torch.Tensor, k: int, title: str, path: Path) -> list[Path]:
    """Three panels: the attention map A, band_k(A) and A - band_k(A), on one log colour scale."""
    band = band_mask(a.shape[-1], k)
    parts = [a, a.masked_fill(~band, 0.0), a.masked_fill(band, 0.0)]
    names = ["A", f"band_{k}(A)", f"A - band_{k}(A)"]
    vmax = float(a.max())
    norm = LogNorm(vmin=max(vmax * 1e-4, 1e-12), vmax=vmax)
    fig = Figure(figsize=(12, 4.2))
    axes = fig.subplots(1, 3)
    for ax, part, name in zip(axes, parts, names):
        image = ax.imshow(part.clamp_min(vmax * 1e-4).numpy(), norm=norm, cmap="viridis",
                          interpolation="nearest")
        ax.set_title(name)
        ax.set_xlabel("key j")
    axes[0].set_ylabel("query i")
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention weight")
    fig.suptitle(title)
    return save(fig, path, tight=True)


def rank_histogram(ranks: pd.DataFrame, k: int, claim: int, path: Path) -> list[Path]:
    """Histogram over heads of the residual's 90% and 99% energy ranks at bandwidth k."""
    at_k = ranks[ranks["k"] == k]
    top = int(max(at_k["rank_90"].max(), at_k["rank_99"].max()))
    bins = np.unique(np.geomspace(1, top + 1, 30).astype(int))
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for col, color in (("rank_90", "C0"), ("rank_99", "C1")):
        ax.hist(at_k[col], bins=bins, alpha=0.6, color=color,
                label=f"{col[5:]}% energy (median {at_k[col].median():g})")
    ax.axvline(claim + 0.5, color="0.3", ls="--", label=f"claim: r <= {claim}")
    ax.set_xscale("log")
    ax.set_xlabel(f"rank of A - band_{k}(A)")
    ax.set_ylabel("heads")
    n = int(at_k["seq_len"].iloc[0]) if len(at_k) else 0
    ax.set_title(f"Residual rank over {len(at_k)} heads, k={k}, N={n}")
    ax.legend()
    return save(fig, path, tight=True)


def singular_decay(decay: pd.DataFrame, path: Path) -> list[Path]:
    """Median over heads of sigma_i / sigma_1 of A - band_k(A) against i, one line per k,
    shaded between the 10th and 90th percentiles."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for i, (k, rows) in enumerate(decay.groupby("k")):
        stats = rows.groupby("index")["sigma_rel"].quantile([0.1, 0.5, 0.9]).unstack()
        ax.plot(stats.index, stats[0.5], color=f"C{i}", label=f"k={k}")
        ax.fill_between(stats.index, stats[0.1], stats[0.9], color=f"C{i}", alpha=0.15)
    ax.set_yscale("log")
    ax.set_xlabel("singular value index i")
    ax.set_ylabel("sigma_i / sigma_1 (median, 10-90%)")
    ax.set_title("Singular-value decay of A - band_k(A)")
    ax.legend()
    return save(fig, path, tight=True)
