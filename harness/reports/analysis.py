"""Scaling analysis: log-log slopes, crossover lengths, and the FMMformer paper's claim check."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from harness.reports.data import (
    BEST, CASE_COLS, CONFIG, NAIVE, baseline_values, ok_values, params_of, scaling_metrics,
)  # fmt: skip
from harness.suite import get_suite


def fit_slope(lengths: np.ndarray, values: np.ndarray) -> float:
    """Least-squares slope of log2(value) against log2(length): p in value ~ length^p."""
    return float(np.polyfit(np.log2(lengths), np.log2(values), 1)[0])


def slopes(df: pd.DataFrame, fit_from: int = 0) -> pd.DataFrame:
    """Fitted log-log slope of time and peak memory against N, per variant and panel.

    Args:
        df: tidy rows of one or more runs.
        fit_from: fit only lengths N >= fit_from (small N is often launch-bound, slope ~0).
    Returns one row per (config, variant, quantity, mode, causal) with at least two positive
    ok points: `slope`, `points` and the fit's range `from_len`..`to_len`.
    """
    out = []
    for suite, metric in scaling_metrics().items():
        rows = ok_values(df, suite, metric)
        rows = rows[(rows["value"] > 0) & (rows["seq_len"] >= fit_from)]
        for key, grp in rows.groupby([*CONFIG, "variant", "mode", "causal"], sort=False):
            grp = grp.sort_values("seq_len")
            if grp["seq_len"].nunique() < 2:
                continue
            out.append({
                **dict(zip([*CONFIG, "variant", "mode", "causal"], key)),
                "quantity": suite,
                "slope": fit_slope(grp["seq_len"].to_numpy(), grp["value"].to_numpy()),
                "points": len(grp),
                "from_len": int(grp["seq_len"].iloc[0]),
                "to_len": int(grp["seq_len"].iloc[-1]),
            })  # fmt: skip
    cols = [*CONFIG, "variant", "quantity", "mode", "causal", "slope", "points", "from_len",
            "to_len"]
    return pd.DataFrame(out, columns=cols)


def crossover(lengths: list[int], ratios: list[float]) -> tuple[float, float, str]:
    """Where a variant overtakes its baseline for good, given ratio = baseline / variant per N.

    Returns (first measured N from which the ratio stays > 1, that length interpolated in
    log-log between the bracketing measurements, a note). NaNs and a note when it never does.
    """
    if not lengths:
        return math.nan, math.nan, "no common lengths"
    i = len(ratios)
    while i > 0 and ratios[i - 1] > 1:
        i -= 1
    if i == len(ratios):
        return math.nan, math.nan, f"not faster up to N={lengths[-1]}"
    if i == 0:
        return lengths[0], math.nan, "faster at every measured N"
    if math.isinf(ratios[i]):
        return lengths[i], math.nan, "baseline OOM from here"
    x0, x1 = math.log2(lengths[i - 1]), math.log2(lengths[i])
    y0, y1 = math.log(ratios[i - 1]), math.log(ratios[i])
    return lengths[i], 2 ** (x0 + (0 - y0) * (x1 - x0) / (y1 - y0)), ""


def crossovers(df: pd.DataFrame, baselines: tuple[str, ...] = (NAIVE, BEST)) -> pd.DataFrame:
    """Crossover length where each efficient (non-softmax) variant overtakes exact softmax.

    Per config, mode and causal flag, against each baseline (`softmax_naive` and the best
    exact kernel). A baseline OOM at N counts as the variant being faster there.
    """
    times = ok_values(df, "time", "time_ms")
    times = times[times["family"] != "softmax"]
    out = []
    for baseline in baselines:
        base = baseline_values(df, "time", "time_ms", baseline)
        joined = times.merge(base, on=list(CASE_COLS), suffixes=("", "_base"))
        joined = joined[joined["value_base"].notna() | joined["oom"]]
        ratio = (joined["value_base"] / joined["value"]).where(~joined["oom"], math.inf)
        joined = joined.assign(ratio=ratio).sort_values("seq_len")
        for key, grp in joined.groupby([*CONFIG, "variant", "mode", "causal"], sort=False):
            at, est, note = crossover(grp["seq_len"].tolist(), grp["ratio"].tolist())
            out.append({**dict(zip([*CONFIG, "variant", "mode", "causal"], key)),
                        "baseline": baseline_label(baseline), "crossover": at,
                        "estimate": est, "note": note})
    cols = [*CONFIG, "variant", "baseline", "mode", "causal", "crossover", "estimate", "note"]
    return pd.DataFrame(out, columns=cols).sort_values(
        [*CONFIG, "baseline", "mode", "causal"], kind="stable", ignore_index=True)


def baseline_label(baseline: str, winner: str | None = None) -> str:
    """Readable baseline name: the variant, or 'best exact' (with the winning kernel)."""
    if baseline != BEST:
        return baseline
    return f"best exact ({winner})" if winner else "best exact"


@dataclass(frozen=True)
class Claim:
    """A claimed factor of the baseline's value over FMMformer's, at one sequence length."""

    text: str
    suite: str
    seq_len: int
    factor: float

    @property
    def metric(self) -> str:
        """The metric the claim's suite measures (time_ms or peak_mem_mib)."""
        return get_suite(self.suite).primary


# FMMformer paper, Figure 6 (rank 3 + band 30 vs softmax, on an RTX 3090 Ti).
CLAIMS = (
    Claim("~10x faster at 2^14", "time", 2**14, 10.0),
    Claim("~40x faster at 2^16", "time", 2**16, 40.0),
    Claim("~100x less memory at 2^16", "memory", 2**16, 100.0),
)
# The paper's factors are read off a log-scale plot of another GPU: a claim holds when the
# measured factor is at least half the claimed one.
TOLERANCE = 2.0
CLAIM_RULE = (
    f"holds: measured factor >= claimed / {TOLERANCE:g} (factors are read off the paper's "
    "log-scale Figure 6, RTX 3090 Ti); does not hold: below that; baseline OOM: the baseline "
    "could not run at that length here, so the factor is unbounded; not measured: no ok row."
)
FIG6_PARAMS = {"bandwidth": 30, "kernels": 3}
NO_FIG6 = "(none)"


def fig6_variants(df: pd.DataFrame) -> list[str]:
    """Labels of the fmm-family variants configured as the paper's rank 3 + band 30."""
    rows = df.loc[df["family"] == "fmm", ["variant", "params"]].drop_duplicates()
    return sorted({
        r.variant for r in rows.itertuples(index=False)
        if all(params_of(r.params).get(k) == v for k, v in FIG6_PARAMS.items())
    })  # fmt: skip


def claim_check(df: pd.DataFrame, claims: tuple[Claim, ...] = CLAIMS) -> pd.DataFrame:
    """Evaluate the paper's claims against `softmax_naive` and the best exact kernel.

    One row per claim, fmm variant, baseline, config, mode and causal flag measured in the
    claim's suite at the claim's length: the measured factor (baseline / fmm) and a verdict
    under `CLAIM_RULE`; a single "not measured" row for a claim whose length was never run.
    """
    variants = fig6_variants(df) or [NO_FIG6]
    out = []
    for claim in claims:
        rows = df[df["suite"] == claim.suite]
        at_len = rows[rows["seq_len"] == claim.seq_len]
        if at_len.empty:  # one line, not one per panel, for a run that never went that far
            out.append({"claim": claim.text, "fmm variant": ", ".join(variants),
                        **_row("", None, "not measured",
                               f"no {claim.suite} rows at N={claim.seq_len}")})
            continue
        groups = at_len[[*CONFIG, "mode", "causal"]].drop_duplicates()
        for baseline in (NAIVE, BEST):
            base = baseline_values(df, claim.suite, claim.metric, baseline)
            base = base[base["seq_len"] == claim.seq_len]
            for group in groups.itertuples(index=False):
                case = dict(zip([*CONFIG, "mode", "causal"], group))
                for variant in variants:
                    out.append({**case, "claim": claim.text, "fmm variant": variant,
                                **_verdict(rows, base, claim, variant, baseline, case)})
    cols = ["claim", "fmm variant", "baseline", *CONFIG, "mode", "causal", "measured (x)",
            "verdict", "note"]  # fmt: skip
    return pd.DataFrame(out, columns=cols)


def _verdict(rows: pd.DataFrame, base: pd.DataFrame, claim: Claim, variant: str,
             baseline: str, case: dict) -> dict:
    """The measured factor and verdict of one claim for one variant, baseline and case."""
    def at(frame: pd.DataFrame) -> pd.DataFrame:
        sel = np.ones(len(frame), dtype=bool)
        for col, value in case.items():
            sel &= (frame[col] == value).to_numpy()
        return frame[sel]

    label = baseline_label(baseline)
    if variant == NO_FIG6:
        return _row(label, None, "not measured", "no fmm variant with bandwidth 30, kernels 3")
    fmm = at(rows[(rows["variant"] == variant) & (rows["seq_len"] == claim.seq_len)])
    fmm = fmm[fmm["metric"] == claim.metric]
    if fmm.empty:
        return _row(label, None, "not measured", f"no {variant} row at N={claim.seq_len}")
    status, value = fmm["status"].iloc[-1], fmm["value"].iloc[-1]
    if status != "ok" or pd.isna(value) or value <= 0:
        return _row(label, None, "not measured", f"{variant} {status} at N={claim.seq_len}")
    b = at(base)
    if b.empty:
        return _row(label, None, "not measured", f"no {label} row at N={claim.seq_len}")
    if b["oom"].iloc[0]:
        return _row(label, None, "baseline OOM", f"{label} OOM at N={claim.seq_len}")
    label = baseline_label(baseline, b["winner"].iloc[0])
    ratio = float(b["value"].iloc[0] / value)
    verdict = "holds" if ratio >= claim.factor / TOLERANCE else "does not hold"
    return _row(label, ratio, verdict, "")


def _row(baseline: str, ratio: float | None, verdict: str, note: str) -> dict:
    return {"baseline": baseline, "measured (x)": math.nan if ratio is None else ratio,
            "verdict": verdict, "note": note}
