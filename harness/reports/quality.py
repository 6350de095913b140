"""Tables of real-attention quality from a run directory: per-variant accuracy over heads on
captured inputs (results.csv), drop-in embedding similarity (dropin.csv), and quality against a
GPU run's time; plus the README section holding them and the studies' sections of the run."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from harness.reports.data import Run
from harness.reports.study import Section, figure_links, section_lines
from harness.reports.tables import markdown_table
from harness.results import read_table

DROPIN_FILE = "dropin.csv"
MARKERS = ("<!-- quality:start -->", "<!-- quality:end -->")
MEANING = (
    "What these numbers mean: how closely each variant, at its registered defaults and without "
    "training (FMMformer's blend weights at their initial 0.5 and 0.5, FMA's average pooling), "
    "reproduces exact attention of one trained model on real text, per head and end to end. "
    "What they do not: quality after training with the variant, at long context (N <= 512 "
    "here), or in a causal language model (MiniLM is one small bidirectional sentence encoder)."
)
SUMMARY = {"rel_err_vs_softmax_head_median": "median", "rel_err_vs_softmax_head_p90": "p90",
           "rel_err_vs_softmax_head_max": "max",
           "rel_err_softmax_floor_head_median": "floor median"}


def quality_table(df: pd.DataFrame, length: int | None = None) -> pd.DataFrame:
    """Per variant and causality, the summaries over (layer, head) of rel_err_vs_softmax on
    captured inputs at N = `length` (default: the largest N), with the floor's median."""
    rows = df[(df["inputs"] != "randn") & (df["suite"] == "accuracy") & (df["status"] == "ok")
              & df["metric"].isin(list(SUMMARY))]
    if rows.empty:
        return pd.DataFrame(columns=["inputs", "variant", "causal", "N", *SUMMARY.values()])
    n = length or int(rows["seq_len"].max())
    rows = rows[rows["seq_len"] == n]
    table = rows.pivot_table(index=["inputs", "causal", "variant"], columns="metric",
                             values="value", aggfunc="last").reset_index()
    table = table.rename(columns=SUMMARY).sort_values(["inputs", "causal", "median"])
    table.insert(3, "N", n)
    return table[["inputs", "causal", "variant", "N",
                  *[c for c in SUMMARY.values() if c in table]]].reset_index(drop=True)


def failed_cases(df: pd.DataFrame) -> pd.DataFrame:
    """Variants with captured-input accuracy cases that did not end ok: the first status and
    reason of each."""
    rows = df[(df["inputs"] != "randn") & (df["suite"] == "accuracy") & (df["status"] != "ok")]
    return rows[["variant", "status", "reason"]].drop_duplicates("variant").reset_index(drop=True)


def speed_points(quality: pd.DataFrame, speed: pd.DataFrame, x: str, n: int,
                 causal: bool = False, mode: str = "fwd") -> pd.DataFrame:
    """Variants present in both: `x` from `quality` (variant -> value) and time_ms of the
    speed run at N = `n`, `mode`, `causal`; columns variant, x, time_ms."""
    times = speed[(speed["suite"] == "time") & (speed["metric"] == "time_ms")
                  & (speed["status"] == "ok") & (speed["seq_len"] == n)
                  & (speed["mode"] == mode) & (speed["causal"] == causal)]
    times = times.groupby("variant")["value"].last().rename("time_ms")
    joined = quality.set_index("variant")[[x]].rename(columns={x: "x"}).join(times, how="inner")
    return joined.dropna().reset_index()


DROPIN_NUMBERS = ("mean_cosine", "min_cosine", "retrieval_at_1")


def dropin_rows(run_dir: Path) -> pd.DataFrame | None:
    """The run's drop-in rows (None without dropin.csv); `ResultsError` if it is malformed."""
    path = Path(run_dir) / DROPIN_FILE
    if not path.is_file():
        return None
    return read_table(path, ("variant", "status", "texts", *DROPIN_NUMBERS), DROPIN_NUMBERS)


def dropin_table(dropin: pd.DataFrame) -> pd.DataFrame:
    """Wide drop-in table: one row per variant, mean cosine and retrieval@1 per text kind."""
    ok = dropin[dropin["status"] == "ok"]
    wide = ok.pivot_table(index="variant", columns="texts", values=list(DROPIN_NUMBERS),
                          aggfunc="last")
    wide.columns = [f"{kind} {metric.replace('_', ' ')}" for metric, kind in wide.columns]
    order = sorted(wide.columns, key=lambda c: (c.split()[0] != "sentences", c))
    first = next((c for c in order if "mean cosine" in c), order[0])
    return wide[order].sort_values(first, ascending=False).reset_index()


def section(run: Run, length: int | None, figures: list[Path], readme_dir: Path,
            speed_note: str, studies: Sequence[Section] = ()) -> str:
    """The README's quality section (markdown) for `run`, with the `studies`' sections of it
    after its own tables."""
    rel = lambda p: Path(os.path.relpath(p, readme_dir)).as_posix()  # noqa: E731
    meta = run.meta
    lines = ["## Quality on real attention", "",
             f"Generated by `python run_bench.py quality {rel(run.dir)} ...` from the committed "
             "run; do not edit by hand. "
             f"Accuracy run: `{meta.get('command', '?')}` (torch {meta.get('torch', '?')}, git "
             f"`{str(meta.get('git_sha', '?'))[:10]}`).", "", MEANING, ""]
    table = quality_table(run.df, length)
    if not table.empty:
        lines += ["**Per-variant accuracy on MiniLM's attention** (relative error against exact "
                  "softmax of each of the 6 x 12 (layer, head) outputs; median, p90 and max over "
                  "heads; floor: exact softmax's own bf16 error). MiniLM is a bidirectional "
                  "encoder: its causal rows apply a causal mask to q, k, v it computed without "
                  "one.", "", markdown_table(table), ""]
    failed = failed_cases(run.df)
    if not failed.empty:
        lines += ["Cases that did not run:", "", markdown_table(failed), ""]
    dropin = dropin_rows(run.dir)
    if dropin is not None and (dropin["status"] == "ok").any():
        lines += ["**Drop-in model quality** (MiniLM with the variant as every layer's "
                  "attention, no training; cosine of each text's embedding to the exact model's, "
                  "and retrieval@1: the share of texts whose nearest exact embedding is their "
                  "own; held-out sentences and passages of Python's documentation; a blank cell: "
                  "not run on that kind of text).", "",
                  markdown_table(dropin_table(dropin)), ""]
    for part in studies:
        lines += section_lines(part, readme_dir)
    for link in figure_links(figures, readme_dir):
        lines += [link, ""]
    if speed_note:
        lines += [speed_note, ""]
    return "\n".join(lines).rstrip() + "\n"
