"""The low-rank claim as a command and as part of the quality report.

    python run_bench.py lowrank --out RUN_DIR [--inputs minilm] [--seq-len N] [--head L,H]

writes RUN_DIR/lowrank.csv (ranks per bandwidth, layer and head), RUN_DIR/lowrank_decay.csv
(normalised singular values) and three figures into RUN_DIR/plots, and prints the rank summary
and the verdict. `run_bench.py quality RUN_DIR` shows the verdict, the summary and two of the
figures when the run has lowrank.csv (`quality_sections`).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from harness.reports.data import Run
from harness.reports.study import Section
from harness.reports.tables import console, rich_table
from harness.results import read_table
from harness.usage import UsageError
from studies.fmmformer.lowrank import (
    CLAIM_K,
    CLAIM_RANK,
    DECAY_FILE,
    LOWRANK_FILE,
    attention_maps,
    rank_summary,
    residual_spectra,
    verdict,
)
from studies.fmmformer.lowrank_plots import map_band_residual, rank_histogram, singular_decay

# The columns of lowrank.csv that the quality report reads, all numbers.
RANK_NUMBERS = ("k", "seq_len", "rank_90", "rank_99", "residual_energy")
MAP_FIGURE, HISTOGRAM_FIGURE, DECAY_FIGURE = (
    "lowrank-map-band-residual", "lowrank-rank-histogram", "lowrank-decay")


def add_command(sub: argparse._SubParsersAction) -> None:
    """The `lowrank` subcommand."""
    low = sub.add_parser("lowrank", help="rank of A - band_k(A) of captured maps, the verdict "
                                         "on the low-rank claim, and its figures")
    low.add_argument("--out", type=Path, required=True, metavar="RUN_DIR")
    low.add_argument("--inputs", default="minilm", help="minilm, smollm2 or file:PATH")
    low.add_argument("--seq-len", type=int, help="N (default: the longest the inputs hold)")
    low.add_argument("--head", help="LAYER,HEAD of the map figure (default: the head of median "
                                    f"residual energy at k={CLAIM_K})")
    low.set_defaults(func=run_lowrank)


def run_lowrank(args: argparse.Namespace) -> int:
    """Ranks and singular values of every captured map into the run directory, the figures,
    and the summary and verdict on the console."""
    from harness.inputs import source

    src = source(args.inputs)
    if not src.captured:
        raise UsageError("lowrank needs captured inputs; valid: minilm, smollm2, file:PATH")
    n = args.seq_len or src.dims[2]
    src.check_length(n)
    qkv = src.qkv(n)
    maps = attention_maps(qkv)
    ranks, decay = residual_spectra(maps)
    ranks.insert(0, "inputs", src.name)
    args.out.mkdir(parents=True, exist_ok=True)
    ranks.to_csv(args.out / LOWRANK_FILE, index=False)
    decay.to_csv(args.out / DECAY_FILE, index=False)
    layer, head = figure_head(args.head, ranks, maps.shape[:2])
    plots = args.out / "plots"
    title = (f"{src.name}, layer {layer}, head {head}, N={n}"
             f"{' (causal)' if qkv.causal else ''}")
    map_band_residual(maps[layer, head], CLAIM_K, title, plots / MAP_FIGURE)
    rank_histogram(ranks, CLAIM_K, CLAIM_RANK, plots / HISTOGRAM_FIGURE)
    singular_decay(decay, plots / DECAY_FIGURE)
    out = console()
    out.print(rich_table(rank_summary(ranks), title=f"rank of A - band_k(A), {src.name}, N={n}"))
    out.print(rich_table(verdict(ranks), title=f"the claim r <= {CLAIM_RANK} at k = {CLAIM_K}"))
    print(f"wrote {args.out / LOWRANK_FILE} and figures to {plots}")
    return 0


def figure_head(choice: str | None, ranks: pd.DataFrame, shape) -> tuple[int, int]:
    """(layer, head) of the map figure: `choice` ("LAYER,HEAD") checked against the maps'
    `shape` (layers, heads), or by default the head whose residual energy share at k=CLAIM_K
    is the median."""
    if choice:
        try:
            layer, head = (int(x) for x in choice.split(","))
        except ValueError:
            raise UsageError(f"--head expects LAYER,HEAD, got '{choice}'") from None
        if not (0 <= layer < shape[0] and 0 <= head < shape[1]):
            raise UsageError(f"--head {choice} is outside {shape[0]} layers x {shape[1]} heads")
        return layer, head
    at_k = ranks[ranks["k"] == CLAIM_K]
    share = at_k["residual_energy"]
    pick = at_k.iloc[(share - share.median()).abs().argsort().iloc[0]]
    return int(pick["layer"]), int(pick["head"])


def quality_sections(run: Run) -> list[Section]:
    """The verdict and the rank summary from the run's lowrank.csv, with the map and histogram
    figures that exist; none without lowrank.csv."""
    path = run.dir / LOWRANK_FILE
    if not path.is_file():
        return []
    ranks = read_table(path, RANK_NUMBERS, RANK_NUMBERS)
    figures = tuple(p for name in (MAP_FIGURE, HISTOGRAM_FIGURE)
                    if (p := run.dir / "plots" / f"{name}.png").is_file())
    caption = (f"(\"r <= {CLAIM_RANK} at k = {CLAIM_K}\"): rank of A - band_k(A) for 90% and "
               f"99% of its energy over the heads' maps at N={int(ranks['seq_len'].max())}; "
               "`residual_energy_median`: the residual's share of the map's energy.")
    return [Section("Low-rank claim", verdict(ranks), caption=caption),
            Section("rank of A - band_k(A)", rank_summary(ranks), figures=figures)]
