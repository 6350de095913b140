"""Tables of real-attention quality from a run directory: per-variant accuracy over heads on
captured inputs (results.csv), drop-in embedding similarity (dropin.csv), and quality against a
GPU run's time; plus the README section holding them and the studies' sections of the run."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from harness.reports.data import Run, one_configuration
from harness.reports.study import Section, figure_links, section_lines
from harness.reports.tables import markdown_table
from harness.results import read_table

DROPIN_FILE = "dropin.csv"
MARKERS = ("<!-- quality:start -->", "<!-- quality:end -->")
ROW_MASKS = {(False,): "non-causal rows", (True,): "causal rows",
             (False, True): "non-causal and causal rows"}
SUMMARY = {"rel_err_vs_softmax_head_median": "median", "rel_err_vs_softmax_head_p90": "p90",
           "rel_err_vs_softmax_head_max": "max",
           "rel_err_softmax_floor_head_median": "floor median"}


def quality_table(df: pd.DataFrame, length: int | None = None) -> pd.DataFrame:
    """Per input source, variant and causality, the summaries over (layer, head) of
    rel_err_vs_softmax on captured inputs at N = `length` (default: each source's largest N),
    with the floor's median."""
    rows = captured_rows(df)
    rows = rows[(rows["status"] == "ok") & rows["metric"].isin(list(SUMMARY))]
    n = length or rows.groupby("inputs")["seq_len"].transform("max")
    rows = rows[rows["seq_len"] == n]
    if rows.empty:
        return pd.DataFrame(columns=["inputs", "causal", "variant", "N", *SUMMARY.values()])
    table = rows.pivot_table(index=["inputs", "causal", "variant", "seq_len"], columns="metric",
                             values="value", aggfunc="last").reset_index()
    table = table.rename(columns={**SUMMARY, "seq_len": "N"})
    table = table.sort_values(["inputs", "causal", "median"])
    return table[["inputs", "causal", "variant", "N",
                  *[c for c in SUMMARY.values() if c in table]]].reset_index(drop=True)


def captured_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The run's accuracy rows on captured inputs."""
    return df[(df["inputs"] != "randn") & (df["suite"] == "accuracy")]


def source_model(inputs: str) -> tuple[str, bool | None]:
    """The model a captured `inputs` source comes from and whether it masks causally (None
    where not known): a packaged model's declaration, else a q, k, v file's own metadata."""
    from harness.capture import CaptureError, read_header
    from harness.packaged import PACKAGED

    if inputs in PACKAGED:
        return PACKAGED[inputs].label, PACKAGED[inputs].causal
    try:
        _, meta = read_header(inputs.removeprefix("file:"))
    except CaptureError:
        return "a model not named here (its q, k, v file is not present)", None
    causal = meta.get("causal")
    return meta.get("model", "an unnamed model"), None if causal is None else causal == "true"


def source_line(df: pd.DataFrame, inputs: str, n: int) -> str:
    """What the accuracy rows of `inputs` at length `n` were measured on: the model, its
    layers x heads, head dim, dtype and which masks, and what a mask the model lacks means."""
    rows = captured_rows(df)
    rows = rows[(rows["inputs"] == inputs) & (rows["seq_len"] == n)]
    model, model_causal = source_model(inputs)
    shapes = ", ".join(f"{b} layers x {h} heads, head dim {d}" for b, h, d in
                       rows[["batch", "heads", "head_dim"]].drop_duplicates().itertuples(False))
    masks = tuple(sorted(rows["causal"].unique()))
    line = (f"`{inputs}`: {model}, {shapes}, N = {n}, "
            f"{', '.join(sorted(rows['dtype'].unique()))}; {ROW_MASKS.get(masks, 'no rows')}.")
    if model_causal is None:
        return f"{line} Whether the model masks its attention causally is not recorded."
    if not model_causal and True in masks:
        return (f"{line} The model is bidirectional: its causal rows apply a causal mask to "
                "q, k, v it computed without one.")
    if model_causal and False in masks:
        return (f"{line} The model is causal: its non-causal rows let each query see keys the "
                "model computed its q, k, v without.")
    return f"{line} The model is {'causal' if model_causal else 'bidirectional'}."


def meaning(df: pd.DataFrame, end_to_end: bool) -> str:
    """What the section's numbers mean and do not, with this run's longest captured N."""
    longest = int(captured_rows(df)["seq_len"].max())
    return ("What these numbers mean: how closely each variant, at its registered defaults and "
            "without training (FMMformer's blend weights at their initial 0.5 and 0.5, FMA's "
            "average pooling), reproduces exact attention of a trained model on real text, per "
            f"head{' and end to end' if end_to_end else ''}. What they do not: quality after "
            f"training with the variant, at longer context than N = {longest} (this run's "
            "longest), or in models other than those named below.")


def failed_cases(df: pd.DataFrame) -> pd.DataFrame:
    """Variants with captured-input accuracy cases that did not end ok: the first status and
    reason of each."""
    rows = captured_rows(df)
    rows = rows[rows["status"] != "ok"]
    return rows[["variant", "status", "reason"]].drop_duplicates("variant").reset_index(drop=True)


def speed_points(quality: pd.DataFrame, speed: pd.DataFrame, x: str, n: int,
                 causal: bool = False, mode: str = "fwd") -> pd.DataFrame:
    """Variants present in both: `x` from `quality` (variant -> value) and time_ms of the
    speed run at N = `n`, `mode`, `causal`, of its one configuration there (`ResultsError` when
    it measured several); columns variant, x, time_ms."""
    times = speed[(speed["suite"] == "time") & (speed["metric"] == "time_ms")
                  & (speed["status"] == "ok") & (speed["seq_len"] == n)
                  & (speed["mode"] == mode) & (speed["causal"] == causal)]
    times = one_configuration(times, n, "speed points")
    times = times.groupby("variant")["value"].last().rename("time_ms")
    joined = quality.set_index("variant")[[x]].rename(columns={x: "x"}).join(times, how="inner")
    return joined.dropna().reset_index()


DROPIN_NUMBERS = ("mean_cosine", "min_cosine", "retrieval_at_1")
DROPIN_COUNTS = ("count", "tokens_min", "tokens_max", "exact_texts")


def dropin_rows(run_dir: Path) -> pd.DataFrame | None:
    """The run's drop-in rows (None without dropin.csv); `ResultsError` if it is malformed or
    lacks the texts' token lengths and exactness (written before they were recorded)."""
    path = Path(run_dir) / DROPIN_FILE
    if not path.is_file():
        return None
    numeric = (*DROPIN_NUMBERS, *DROPIN_COUNTS)
    return read_table(path, ("variant", "status", "texts", *numeric), numeric)


def last_ok(dropin: pd.DataFrame) -> pd.DataFrame:
    """The drop-in rows that ran, the last of each (variant, text kind)."""
    ok = dropin[dropin["status"] == "ok"]
    return ok.drop_duplicates(["variant", "texts"], keep="last")


def exact_variants(dropin: pd.DataFrame, kind: str) -> list[str]:
    """Variants that computed exact attention at every token length of the `kind` texts
    (`exact_texts` = `count`): their numbers there measure nothing of their approximation."""
    ok = last_ok(dropin)
    ok = ok[ok["texts"] == kind]
    return sorted(ok.loc[ok["exact_texts"] == ok["count"], "variant"])


def dropin_table(dropin: pd.DataFrame, mark_exact: bool = False) -> pd.DataFrame:
    """Wide drop-in table: one row per variant, mean cosine and retrieval@1 per text kind;
    with `mark_exact`, a variant's cells of a kind it computed exactly read `exact`."""
    ok = last_ok(dropin)
    wide = ok.pivot_table(index="variant", columns="texts", values=list(DROPIN_NUMBERS),
                          aggfunc="last")
    wide.columns = [f"{kind} {metric.replace('_', ' ')}" for metric, kind in wide.columns]
    order = sorted(wide.columns, key=lambda c: (c.split()[0] != "sentences", c))
    first = next((c for c in order if "mean cosine" in c), order[0])
    wide = wide[order].sort_values(first, ascending=False)
    if mark_exact:
        wide = wide.astype(object)
        for kind in ok["texts"].unique():
            cells = [c for c in order if c.split()[0] == kind]
            wide.loc[exact_variants(dropin, kind), cells] = "exact"
    return wide.reset_index()


def text_sets(dropin: pd.DataFrame) -> str:
    """The text kinds of the drop-in rows, each with its count and token lengths."""
    parts = []
    for kind, rows in dropin.groupby("texts", sort=False):
        counts = sorted({int(c) for c in rows["count"]})
        count = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        parts.append(f"{count} held-out {kind} ({int(rows['tokens_min'].min())}-"
                     f"{int(rows['tokens_max'].max())} tokens)")
    return " and ".join(parts)


def partly_exact(dropin: pd.DataFrame) -> str:
    """The variants exact at some but not all lengths of a text kind, with how many texts."""
    ok = last_ok(dropin)
    some = ok[(ok["exact_texts"] > 0) & (ok["exact_texts"] < ok["count"])]
    return ", ".join(f"{r.variant} on {int(r.exact_texts)} of {int(r.count)} {r.texts}"
                     for r in some.itertuples())


def dropin_caption(dropin: pd.DataFrame) -> str:
    """The drop-in table's caption: model, dtype, text sets and what an `exact` cell means."""
    from harness.packaged import MINILM

    dtypes = ", ".join(sorted(last_ok(dropin)["dtype"].astype(str).unique()))
    some = partly_exact(dropin)
    return (f"**Drop-in model quality** ({MINILM.label} with the variant as every layer's "
            f"attention, no training, {dtypes}; cosine of each text's embedding to the exact "
            "model's, and retrieval@1: the share of texts whose nearest exact embedding is "
            f"their own; {text_sets(dropin)} of Python's documentation; a blank cell: not run "
            "on that kind of text; `exact`: the variant computed exact attention (within the "
            "accuracy suite's floor rule) in every layer at every token length of that kind, "
            "so its numbers there say nothing of its approximation"
            f"{f'; exact at some lengths only: {some}' if some else ''}).")


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
             f"`{str(meta.get('git_sha', '?'))[:10]}`).", ""]
    dropin = dropin_rows(run.dir)
    has_dropin = dropin is not None and (dropin["status"] == "ok").any()
    lines += [meaning(run.df, has_dropin), ""]
    table = quality_table(run.df, length)
    if not table.empty:
        floor = (" floor: exact softmax's own error in the dtype named below;"
                 if "floor median" in table else "")
        lines += ["**Per-variant accuracy on captured attention** (relative error against exact "
                  "softmax of each (layer, head) output; median, p90 and max over heads;"
                  f"{floor} inputs below).", ""]
        lines += [f"- {source_line(run.df, inputs, int(part['N'].iloc[0]))}"
                  for inputs, part in table.groupby("inputs", sort=False)]
        lines += ["", markdown_table(table), ""]
    failed = failed_cases(run.df)
    if not failed.empty:
        lines += ["Cases that did not run:", "", markdown_table(failed), ""]
    if has_dropin:
        lines += [dropin_caption(dropin), "", markdown_table(dropin_table(dropin, True)), ""]
    for part in studies:
        lines += section_lines(part, readme_dir)
    for link in figure_links(figures, readme_dir):
        lines += [link, ""]
    if speed_note:
        lines += [speed_note, ""]
    return "\n".join(lines).rstrip() + "\n"
