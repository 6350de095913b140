"""Performance targets of the FMMformer and FMA Triton kernels, evaluated from a run's rows.

Every target is read off the rows of one configuration (device, dtype, batch, heads, head_dim
and inputs; bf16, B=1, H=16, D=64 at N=65536 by default) and the roofline of the run's
meta.json; rows of several configurations at the target length are refused (`ResultsError`),
so a target's halves never come from different problems. Nothing here is hard-coded but the
targets themselves.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from harness.reports.data import one_configuration

N_TARGET = 65536
MIB = 2**20


class TargetsError(ValueError):
    """Runs that do not pool into one set of targets (one-line message)."""


@dataclass(frozen=True)
class Lookup:
    """Reads single measured values out of tidy rows of one configuration (`one_configuration`);
    a case measured in several pooled runs takes the last one's row. `sources` collects the
    run ids of the rows read."""

    df: pd.DataFrame
    meta: dict
    n: int = N_TARGET
    sources: set[str] = field(default_factory=set)

    def value(self, variant: str, metric: str, mode: str = "fwd", causal: bool = False,
              n: int | None = None) -> float | None:
        rows = self.df[(self.df.variant == variant) & (self.df.metric == metric)
                       & (self.df["mode"] == mode) & (self.df.causal == causal)
                       & (self.df.seq_len == (n or self.n)) & (self.df.status == "ok")]
        if rows.empty:
            return None
        self.sources.add(str(rows.run_id.iloc[-1]))
        return float(rows.value.iloc[-1])

    def time(self, variant: str, mode: str = "fwd", causal: bool = False, n: int | None = None):
        return self.value(variant, "time_ms", mode, causal, n)

    @property
    def copy_gbps(self) -> float | None:
        return (self.meta.get("roofline") or {}).get("copy_gbps")

    def output_mib(self) -> float | None:
        """Size of o (B*H*N*D elements of the run's dtype) at the target length."""
        rows = self.df[self.df.seq_len == self.n]
        if rows.empty:
            return None
        r = rows.iloc[0]
        size = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}[r["dtype"]]
        return r["batch"] * r["heads"] * r["seq_len"] * r["head_dim"] * size / MIB

    def slope(self, variant: str, metric: str, causal: bool, lo: int = 2**14) -> float | None:
        rows = self.df[(self.df.variant == variant) & (self.df.metric == metric)
                       & (self.df["mode"] == "fwd") & (self.df.causal == causal)
                       & (self.df.status == "ok") & self.df.seq_len.between(lo, self.n)]
        if not {lo, self.n} <= set(rows.seq_len):  # a slope needs both ends measured
            return None
        self.sources.update(rows.run_id.astype(str))
        return float(np.polyfit(np.log2(rows.seq_len), np.log2(rows.value), 1)[0])


Check = Callable[[Lookup], tuple[float | None, float | None]]  # (measured, required)


@dataclass(frozen=True)
class Target:
    """A target of one group of kernels: `measured <= required` (or >= when
    `higher_is_better`)."""

    group: str
    name: str
    check: Check
    higher_is_better: bool = False
    unit: str = ""

    def evaluate(self, look: Lookup) -> dict:
        try:
            measured, required = self.check(look)
        except TypeError:  # an arithmetic on a value that was not measured
            measured, required = None, None
        if measured is None or required is None:
            verdict = "not measured"
        else:
            met = measured >= required if self.higher_is_better else measured <= required
            verdict = "met" if met else "missed"
        sign = ">=" if self.higher_is_better else "<="
        return {"group": self.group, "target": self.name, "measured": measured,
                "required": None if required is None else f"{sign} {required:.3g}{self.unit}",
                "verdict": verdict}


def _sum(*values):
    return None if any(v is None for v in values) else sum(values)


def _min(*values):
    present = [v for v in values if v is not None]
    return min(present) if present else None


def _ratio(a, b):
    return None if a is None or b is None else a / b


def _peer_sum(look: Lookup, mode: str, causal: bool):
    """window_flex plus the faster of linear / linear_fla, run back to back."""
    linear = _min(look.time("linear", mode, causal), look.time("linear_fla", mode, causal))
    return _sum(look.time("window_flex", mode, causal), linear)


# The FMMformer kernels (window, linear and their blend) and the Fast Multipole Attention ones.
FMM, FMA = "fmmformer", "fma"
TARGETS: list[Target] = [
    Target(FMM, "1. fmmformer_triton fwd non-causal GB/s (q,k,v,o once) >= 50% of copy",
           lambda L: (L.value("fmmformer_triton", "gbps"), _ratio(L.copy_gbps, 2)), True, " GB/s"),
    *[Target(FMM, f"2. fmmformer_triton {m}{' causal' if c else ''} time <= "
                f"(window_flex + best linear) / {f}",
             lambda L, m=m, c=c, f=f: (L.time("fmmformer_triton", m, c),
                                       _ratio(_peer_sum(L, m, c), f)), unit=" ms")
      for m, f in (("fwd", 2.0), ("fwd_bwd", 1.5)) for c in (False, True)],
    *[Target(FMM, f"3. fmmformer_triton fwd_bwd / fwd{' causal' if c else ''}",
             lambda L, c=c: (_ratio(L.time("fmmformer_triton", "fwd_bwd", c),
                                    L.time("fmmformer_triton", "fwd", c)), 4.0))
      for c in (False, True)],
    *[Target(FMM, f"4. window_triton{'' if k == 30 else f'[k={k}]'} {m}{' causal' if c else ''} "
                f"/ window_flex",
             lambda L, k=k, m=m, c=c: (_ratio(
                 L.time("window_triton" if k == 30 else f"window_triton[k={k}]", m, c),
                 L.time("window_flex" if k == 30 else f"window_flex[k={k}]", m, c)), 1.2))
      for k in (30, 256) for m in ("fwd", "fwd_bwd") for c in (False, True)],
    *[Target(FMM, f"5. linear_triton causal {m} time <= linear_fla",
             lambda L, m=m: (L.time("linear_triton", m, True), L.time("linear_fla", m, True)),
             unit=" ms") for m in ("fwd", "fwd_bwd")],
    Target(FMM, "5. linear_triton fwd non-causal GB/s >= 50% of copy",
           lambda L: (L.value("linear_triton", "gbps"), _ratio(L.copy_gbps, 2)), True, " GB/s"),
    Target(FMM, "6. fmmformer_triton fwd peak extra memory <= 1.1 x output",
           lambda L: (L.value("fmmformer_triton", "peak_mem_mib"), 1.1 * L.output_mib()),
           unit=" MiB"),
    Target(FMM, "7. fmmformer_triton causal fwd / non-causal fwd",
           lambda L: (_ratio(L.time("fmmformer_triton", "fwd", True),
                             L.time("fmmformer_triton"),), 1.5)),
    *[Target(FMA, f"1. softmax_sdpa / fma_triton fwd{' causal' if c else ''} speed-up",
             lambda L, c=c: (_ratio(L.time("softmax_sdpa", "fwd", c),
                                    L.time("fma_triton", "fwd", c)), 50.0), True)
      for c in (False, True)],
    Target(FMA, "1. fma_triton fwd non-causal GB/s >= 40% of copy",
           lambda L: (L.value("fma_triton", "gbps"), None if L.copy_gbps is None
                      else 0.4 * L.copy_gbps), True, " GB/s"),
    *[Target(FMA, f"2. fma_triton fwd {q} log-log slope 2^14..N{' causal' if c else ''}",
             lambda L, q=q, c=c: (L.slope("fma_triton", q, c), 1.2))
      for q in ("time_ms", "peak_mem_mib") for c in (False, True)],
    *[Target(FMA, f"3. fma_triton fwd_bwd / fwd{' causal' if c else ''}",
             lambda L, c=c: (_ratio(L.time("fma_triton", "fwd_bwd", c),
                                    L.time("fma_triton", "fwd", c)), 4.0))
      for c in (False, True)],
]


def evaluate_targets(df: pd.DataFrame, meta: dict, n: int = N_TARGET) -> pd.DataFrame:
    """One row per target: group, target, measured, required, verdict, and the runs its
    measured values come from; the rows are those of the one configuration at length `n`
    (`ResultsError` if several), the roofline is `meta`'s."""
    rows = one_configuration(df, n, "targets")
    out = []
    for target in TARGETS:
        look = Lookup(rows, meta, n)
        out.append({**target.evaluate(look), "runs": ", ".join(sorted(look.sources))})
    return pd.DataFrame(out)


def accuracy_side_by_side(df: pd.DataFrame, n: int = N_TARGET) -> pd.DataFrame:
    """rel_err_vs_softmax of the FMA and FMMformer variants at length n (rows of its one
    configuration), side by side."""
    df = one_configuration(df, n, "targets")
    rows = df[(df.metric.isin(["rel_err_vs_softmax", "rel_err_softmax_floor"]))
              & (df.family.isin(["fmm", "multipole"])) & (df.seq_len == n) & (df.status == "ok")]
    table = rows.pivot_table(index=["variant", "causal"], columns="metric", values="value",
                             aggfunc="last")
    return table.reset_index()
