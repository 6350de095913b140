"""The papers' quality claims restated as orderings on the trained tasks: FMMformer's language
modelling and Long Range Arena results, FMA's enwik8 result, and Zoology's finding on MQAR,
each checked at every setting of its task in a run of the task suite (`task_sections`, shown by
`run_bench.py tasks RUN_DIR`)."""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from harness.reports.data import Run
from harness.reports.study import Section
from harness.reports.tasks import scores, task_rows
from harness.suite import higher_is_better

NOT_REPRODUCIBLE = (
    "The papers' absolute numbers (Long Range Arena accuracies, WikiText-103 perplexity, enwik8 "
    "bits per character) are not reproducible here: these are small models trained for a few "
    "million tokens on generated data and the Python standard library, so only the direction "
    "of each claim is tested."
)
CAPTION = "(means over seeds; a family's best variant stands for it). " + NOT_REPRODUCIBLE


@dataclass(frozen=True)
class Ordering:
    """A claim as an ordering of families on one task's metric, best first; a tuple in `order`
    groups families of one rank: each must be at least as good as every family of the next."""

    text: str
    source: str
    metric: str
    task: str
    order: tuple[str | tuple[str, ...], ...]


CLAIMS = (
    Ordering("bpc softmax <= fmmformer <= linear",
             "FMMformer: WikiText-103 perplexity 34.29 <= 36.11 <= 38.40", "bpc", "charlm",
             ("softmax", "fmm", "linear")),
    Ordering("accuracy fmmformer >= linear", "FMMformer: LRA average above linear attention's",
             "accuracy", "listops", ("fmm", "linear")),
    Ordering("accuracy fmmformer >= softmax", "FMMformer: LRA average 60.74 vs softmax 58.70",
             "accuracy", "listops", ("fmm", "softmax")),
    Ordering("bpc fma <= fmmformer, linear, window",
             "FMA: beats other efficient methods on enwik8", "bpc", "charlm",
             ("multipole", ("fmm", "linear", "window"))),
    Ordering("accuracy softmax >= linear",
             "Zoology: attention solves MQAR, linear attention does not", "accuracy", "mqar",
             ("softmax", "linear")),
)


def family_score(s: pd.DataFrame, setting: str, family: str, higher: bool):
    """(variant, mean, std) of the family's best variant in `setting` of the scores `s`, or
    None."""
    rows = s[(s["setting"] == setting) & (s["family"] == family)]
    if rows.empty:
        return None
    best = rows.loc[rows["mean"].idxmax() if higher else rows["mean"].idxmin()]
    return best["variant"], best["mean"], best["std"]


def claim_check(rows: pd.DataFrame) -> pd.DataFrame:
    """Each claim at each setting of its task in the task rows `rows`: the measured values and
    holds / does not hold (on the means over seeds; a family's best variant stands for it)."""
    s = scores(rows)
    out = []
    for claim in CLAIMS:
        higher = higher_is_better(claim.metric)
        entry = {"claim": claim.text, "source": claim.source}
        settings = sorted(s[s["task"] == claim.task]["setting"].unique())
        if not settings:
            out.append({**entry, "setting": claim.task,
                        "measured": "not measured (task not in this run)", "verdict": "n/a"})
        for setting in settings:
            groups = [g if isinstance(g, tuple) else (g,) for g in claim.order]
            found = [[x for f in g if (x := family_score(s, setting, f, higher))]
                     for g in groups]
            if any(not g for g in found):
                out.append({**entry, "setting": setting,
                            "measured": "not measured (a family is missing)", "verdict": "n/a"})
                continue
            holds = all(_better_or_equal(a[1], b[1], higher)
                        for first, second in zip(found, found[1:]) for a in first for b in second)
            measured = "; ".join(f"{v} {m:.3f}" + (f" ± {sd:.3f}" if sd == sd else "")
                                 for g in found for v, m, sd in g)
            out.append({**entry, "setting": setting, "measured": measured,
                        "verdict": "holds" if holds else "does not hold"})
    return pd.DataFrame(out, columns=["claim", "setting", "source", "measured", "verdict"])


def _better_or_equal(a: float, b: float, higher: bool) -> bool:
    return a >= b if higher else a <= b


def task_sections(run: Run) -> list[Section]:
    """The claim check of a task-suite run; none when the run has no task rows."""
    rows = task_rows(run.df)
    if rows.empty:
        return []
    return [Section("Claim check", claim_check(rows), caption=CAPTION)]
