"""Scaling analysis: log-log slopes and the lengths from which a variant overtakes exact
attention."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from harness.registry import EXACT
from harness.reports.data import BEST, CASE_COLS, CONFIG, baseline_values, ok_values, scaling_metrics


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


def crossovers(df: pd.DataFrame, baselines: tuple[str, ...] = (EXACT, BEST)) -> pd.DataFrame:
    """Crossover length where each efficient (non-softmax) variant overtakes exact softmax.

    Per config, mode and causal flag, against each baseline (the registry's exact reference,
    `softmax_naive`, and the best exact kernel). A baseline OOM at N counts as the variant being faster there.
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
