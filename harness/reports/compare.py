"""Compare two runs case by case: ratios, noise bands, regressions, environment drift."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from harness.calibration import spread_warnings
from harness.reports.data import ROW_KEY, Run
from harness.reports.tables import console, drop_constant, markdown_table, rich_table
from harness.results import ResultsError
from harness.suite import find_metric, higher_is_better

KEY = [c for c in ROW_KEY if c != "metric"]  # case key plus device
FINGERPRINT = ("device", "gpu", "driver", "cuda", "torch", "triton")
# How far a case got: a step up is a regression (ok -> inexact, ok or inexact -> oom, error,
# nan, timeout); `skipped` (could not run there) is judged on neither side.
RANK = {"ok": 0, "inexact": 1}
FAILED_RANK = 2
MEASURED = tuple(RANK)  # statuses whose rows hold a value


def parse_threshold(text: str) -> float:
    """A threshold as a fraction: '5%' -> 0.05, '0.05' -> 0.05 (a bare number >= 1 is percent)."""
    raw = text.strip()
    try:
        value = float(raw.rstrip("%"))
    except ValueError:
        raise ValueError(f"bad threshold '{text}'; expected e.g. 5% or 0.05") from None
    value = value / 100 if raw.endswith("%") or value >= 1 else value
    if not 0 <= value < 10:
        raise ValueError(f"threshold '{text}' is out of range")
    return value


@dataclass
class Comparison:
    """The outcome of `compare_runs`: per-case table and what could not be compared."""

    metric: str
    threshold: float
    table: pd.DataFrame  # KEY, old, new, ratio, noise, change
    only_old: pd.DataFrame  # KEY of the old run's cases (not skipped) the new run lacks
    only_new: pd.DataFrame
    status_changes: pd.DataFrame  # KEY, old_status, new_status, reason, change
    warnings: list[str]
    allow_missing: bool = False  # cases of the old run absent from the new one do not fail

    @property
    def regressions(self) -> int:
        """Cases with a value regression beyond threshold and noise, or that newly fail, plus
        (unless `allow_missing`) the old run's cases missing from the new run."""
        worse = pd.concat([self.table.loc[self.table["change"] == "regression", KEY],
                           self.status_changes.loc[self.status_changes["change"] == "regression",
                                                   KEY]])
        missing = 0 if self.allow_missing else len(self.only_old)
        return len(worse.drop_duplicates()) + missing


def noise_bands(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per case, the run's own p20..p80 band of `metric` (KEY, lo, hi); empty when it has none.

    A metric declared with a `band` (time_ms) has measured p20/p80; one declared as the
    `rate_of` such a metric (tflops, ...) scales as its inverse.
    """
    empty = pd.DataFrame(columns=[*KEY, "lo", "hi"])
    decl = find_metric(metric)
    base = decl if decl is None or decl.band else find_metric(decl.rate_of or "")
    if decl is None or base is None or base.band is None:
        return empty
    p20, p80 = base.band
    names = {base.name, p20, p80, metric}
    rows = df[df["metric"].isin(names) & (df["status"] == "ok")]
    wide = rows.pivot_table(index=KEY, columns="metric", values="value").reset_index()
    if not names <= set(wide.columns):
        return empty
    if metric == base.name:
        lo, hi = wide[p20], wide[p80]
    else:
        lo = wide[metric] * wide[base.name] / wide[p80]
        hi = wide[metric] * wide[base.name] / wide[p20]
    return wide[KEY].assign(lo=lo, hi=hi).dropna()


def environment_warnings(old: Run, new: Run) -> list[str]:
    """Lines saying where the two runs' environment fingerprints (meta.json) differ."""
    out = [f"no meta.json beside {run.dir}: environment not checked"
           for run in (old, new) if not run.meta]
    if old.meta and new.meta:
        out += [f"{key} differs: {old.meta.get(key)} (old) vs {new.meta.get(key)} (new)"
                for key in FINGERPRINT if old.meta.get(key) != new.meta.get(key)]
        graphs = [bool(run.meta.get("config", {}).get("cuda_graph")) for run in (old, new)]
        if graphs[0] != graphs[1]:
            method = ["CUDA-graph replays" if g else "calls as made" for g in graphs]
            out.append(f"timing differs: {method[0]} (old) vs {method[1]} (new); short "
                       "calls differ by the Python launch path")
    return out


def case_statuses(df: pd.DataFrame, metric: str, suites: set[str]) -> pd.DataFrame:
    """Per case of `suites` (KEY): its `metric` row's status and reason, or, for a case that
    failed before measuring (one row of the suite's primary metric), that row's."""
    rows = df[df["suite"].isin(suites)]
    failed = rows[(rows["metric"] != metric) & ~rows["status"].isin(MEASURED)]
    picked = pd.concat([rows[rows["metric"] == metric], failed])
    return picked.drop_duplicates(KEY)[[*KEY, "status", "reason"]]


def compare_runs(
    old: Run, new: Run, metric: str = "time_ms", threshold: float = 0.05,
    allow_missing: bool = False,
) -> Comparison:
    """Join two runs on the case key (plus device) and classify each change of `metric`.

    A change is a regression when the medians differ by more than `threshold` AND so do the
    two runs' p20..p80 bands at their closest: the new run's p20 time must exceed the old
    run's p80 by more than `threshold` (for rates, the old p20 rate the new p80). Both runs'
    spread so counts against a verdict. Metrics without a band (memory, accuracy) are judged
    on their values alone; `inexact` values are judged like `ok` ones.
    A case newly fails when its status steps up from ok to inexact, or from ok or inexact to
    oom, error, nan or timeout. The old run's cases that the new run lacks count as
    regressions unless `allow_missing`.
    Raises `ResultsError` when `metric` is missing from a run or no case is shared.
    """
    for run, which in ((old, "old"), (new, "new")):
        if not (run.df["metric"] == metric).any():
            raise ResultsError(f"the {which} run ({run.dir}) has no '{metric}' rows")
    a, b = (r.df[r.df["metric"] == metric] for r in (old, new))
    both = a.merge(b, on=KEY, suffixes=("_old", "_new"))
    if both.empty:
        raise ResultsError(f"the two runs share no '{metric}' case: nothing to compare")
    suites = set(a["suite"]) | set(b["suite"])
    cases = case_statuses(old.df, metric, suites).merge(
        case_statuses(new.df, metric, suites), on=KEY, how="outer", suffixes=("_old", "_new"),
        indicator=True)

    ok = both[both["status_old"].isin(MEASURED) & both["status_new"].isin(MEASURED)
              & both["value_old"].notna() & both["value_new"].notna()]
    table = ok[KEY].assign(old=ok["value_old"], new=ok["value_new"])
    with np.errstate(divide="ignore", invalid="ignore"):
        table["ratio"] = np.where(table["old"] == table["new"], 1.0, table["new"] / table["old"])
    higher = higher_is_better(metric)
    worse = table["ratio"] if not higher else 1 / table["ratio"]
    bands = _bands(table, noise_bands(old.df, metric), noise_bands(new.df, metric))
    known = bands[["lo_old", "hi_old", "lo_new", "hi_new"]].notna().all(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        # The change as the two spreads least favour it: the new run's better quantile against
        # the old run's worse one (and the reverse for an improvement).
        worse_at_least = np.where(higher, bands["lo_old"] / bands["hi_new"],
                                  bands["lo_new"] / bands["hi_old"])
        better_at_least = np.where(higher, bands["lo_new"] / bands["hi_old"],
                                   bands["lo_old"] / bands["hi_new"])
        # Without bands (NaN) the comparisons are False and unused: ~known decides.
        limit = 1 + threshold
        slower = (worse > limit) & (~known | (worse_at_least > limit))
        faster = (worse < 1 / limit) & (~known | (better_at_least > limit))
    table["noise"] = np.where(~known, "n/a", np.where(slower | faster, "beyond", "within"))
    table["change"] = np.select(
        [slower, faster, (worse > limit) | (worse < 1 / limit)],
        ["regression", "improvement", "within noise"], default="",
    )  # fmt: skip
    order = table["change"].map({"regression": 0, "improvement": 1}).fillna(2)
    table = table.assign(_o=order, _w=-worse).sort_values(["_o", "_w"]).drop(columns=["_o", "_w"])

    moved = cases[(cases["_merge"] == "both") & (cases["status_old"] != cases["status_new"])]
    rank_old, rank_new = (moved[col].map(RANK).fillna(FAILED_RANK)
                          for col in ("status_old", "status_new"))
    skipped = (moved["status_old"] == "skipped") | (moved["status_new"] == "skipped")
    status_changes = moved[KEY].assign(
        old_status=moved["status_old"], new_status=moved["status_new"], reason=moved["reason_new"],
        change=np.where((rank_new > rank_old) & ~skipped, "regression", ""),
    )  # fmt: skip
    return Comparison(
        metric=metric, threshold=threshold, table=table.reset_index(drop=True),
        only_old=cases.loc[(cases["_merge"] == "left_only") & (cases["status_old"] != "skipped"),
                           KEY].reset_index(drop=True),
        only_new=cases.loc[cases["_merge"] == "right_only", KEY].reset_index(drop=True),
        status_changes=status_changes.reset_index(drop=True),
        warnings=[*environment_warnings(old, new),
                  *spread_warnings({"old": old.meta, "new": new.meta}, threshold)],
        allow_missing=allow_missing,
    )  # fmt: skip


def _bands(table: pd.DataFrame, old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """Per row of `table`, the old and new p20..p80 bands (lo_old, hi_old, lo_new, hi_new)."""
    bands = table[KEY].merge(old, on=KEY, how="left").merge(new, on=KEY, how="left",
                                                           suffixes=("_old", "_new"))
    return bands.set_axis(table.index)


def summary(comp: Comparison) -> str:
    """One line: how many cases were compared and how many changed beyond threshold and noise."""
    counts = comp.table["change"].value_counts()
    failing = int((comp.status_changes["change"] == "regression").sum())
    missing = (f"; {len(comp.only_old)} missing from the new run"
               + (" (allowed)" if comp.allow_missing else "")) if len(comp.only_old) else ""
    return (f"{len(comp.table)} cases compared on {comp.metric} "
            f"(threshold {comp.threshold * 100:g}%): "
            f"{counts.get('regression', 0)} regressions, {counts.get('improvement', 0)} "
            f"improvements, {counts.get('within noise', 0)} within noise; {failing} newly failing"
            f"{missing}")


def display(frame: pd.DataFrame) -> pd.DataFrame:
    """A compare frame for people: `N` for seq_len, columns that never vary dropped."""
    frame = frame.rename(columns={"seq_len": "N", "head_dim": "D", "heads": "H", "batch": "B"})
    return drop_constant(frame, ["suite", "B", "H", "D", "dtype", "device"])


def print_comparison(comp: Comparison, markdown: bool = False) -> None:
    """Print the comparison (rich tables, or markdown for PR text); warnings go to stderr."""
    err = console(stderr=True)
    for line in comp.warnings:
        err.print(f"[yellow]warning:[/] {line}", markup=True, highlight=False)
    sections = [(f"{comp.metric}: new / old", comp.table),
                ("status changes", comp.status_changes),
                ("only in the old run (missing from the new run)", comp.only_old),
                ("only in the new run", comp.only_new)]
    if markdown:
        print(f"**{summary(comp)}**\n")
        for title, frame in sections:
            if not frame.empty:
                print(f"{title}:\n\n{markdown_table(display(frame))}\n")
        return
    out = console()
    for title, frame in sections:
        if not frame.empty:
            out.print(rich_table(display(frame), title=title))
    out.print(summary(comp), highlight=False)
