"""The FMMformer paper's Figure 6 claims, checked against a run: FMMformer (rank 3 + band 30)
~10x faster than softmax at 2^14, ~40x at 2^16, ~100x less memory at 2^16."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from harness.reports.analysis import baseline_label
from harness.reports.data import BEST, CONFIG, baseline_values, params_of
from harness.suite import get_suite

PAPER_BASELINE = "softmax_naive"  # the paper's softmax: the N x N matrix in memory


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
        for baseline in (PAPER_BASELINE, BEST):
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
