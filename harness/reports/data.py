"""Load runs and select rows: the one place that knows how the tidy results are laid out."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from harness.registry import family_rank
from harness.results import (
    CASE_KEY, META_FILE, OPTIONAL_COLUMNS, RESULTS_FILE, ResultsError, load_results,
)  # fmt: skip
from harness.suite import scaling_suites

# One scaling figure (and one analysis group) per hardware/problem configuration; each input
# source (randn, a captured model's q, k, v, a task's problems) is a problem of its own.
CONFIG = ("device", "dtype", "batch", "heads", "head_dim", "inputs")
RANDN = OPTIONAL_COLUMNS["inputs"]  # the default source, left out of names and titles
# A case plus the device: two runs on different devices never share a case.
ROW_KEY = (*CASE_KEY, "device", "metric")
INT_COLUMNS = ("batch", "heads", "seq_len", "head_dim")
# A measured case within one run, less variant and suite: what baselines are matched on.
CASE_COLS = (*CONFIG, "mode", "causal", "seq_len")
BEST = "best"  # per case, the best ok softmax-family variant
FLOOR = "rel_err_softmax_floor"  # metric: exact softmax's own low-precision error (accuracy)
NOT_EXACT = ("inexact", "error", "nan")  # accuracy statuses that disqualify a best exact kernel


def one_configuration(df: pd.DataFrame, n: int, what: str) -> pd.DataFrame:
    """The rows (at every length) of the one configuration (`CONFIG`) measured at length `n`;
    `ResultsError` naming the configurations when the rows at `n` hold several (`what` are
    read on one)."""
    key = pd.Series([" ".join(map(str, row)) for row in df[list(CONFIG)].itertuples(index=False)],
                    index=df.index)
    found = key[df.seq_len == n].unique()
    if len(found) > 1:
        raise ResultsError(f"the rows at N={n} hold {len(found)} configurations "
                           f"({'; '.join(sorted(found))}; columns {' '.join(CONFIG)}): "
                           f"{what} are read on one; pool runs of one configuration")
    return df[key.isin(found)]


@dataclass(frozen=True)
class Run:
    """One run: the directory holding its results CSV, its tidy rows and its meta.json."""

    dir: Path
    df: pd.DataFrame
    meta: dict

    @property
    def name(self) -> str:
        """The run id from meta.json, else from the rows, else the directory name."""
        ids = self.df["run_id"].dropna().astype(str).unique()
        fallback = ids[0] if len(ids) else self.dir.name
        return str(self.meta.get("run_id") or fallback)


def load_run(path: str | Path) -> Run:
    """Load a run directory or a results CSV (with the meta.json beside it, if any).

    Raises `ResultsError` (one line) when the file is missing, malformed or mistyped.
    """
    path = Path(path)
    csv = path / RESULTS_FILE if path.is_dir() else path
    df = tidy(load_results(csv))
    meta_path = csv.parent / META_FILE
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResultsError(f"{meta_path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ResultsError(f"{meta_path} is not a JSON object")
    return Run(dir=csv.parent, df=df, meta=meta)


def tidy(df: pd.DataFrame) -> pd.DataFrame:
    """Normalize column types and keep the last row of each (case, device, metric).

    A resumed or repeated case writes its rows again; the newest measurement wins.
    """
    df = df.copy()
    for col in INT_COLUMNS:
        num = pd.to_numeric(df[col], errors="coerce")
        if num.isna().any():
            raise ResultsError(f"column {col} holds a non-integer value")
        df[col] = num.astype(int)
    causal = df["causal"].astype(str).str.strip().str.lower()
    if not causal.isin(["true", "false", "1", "0"]).all():
        raise ResultsError("column causal holds a value other than True/False")
    df["causal"] = causal.isin(["true", "1"])
    inputs = df["inputs"].astype(object)
    df["inputs"] = inputs.where(inputs.notna() & (inputs != ""), RANDN).astype(str)
    for col in ("run_id", "variant", "family", "suite", "mode", "dtype", "device", "metric",
                "status", "unit"):
        df[col] = df[col].fillna("").astype(str)
    return df.drop_duplicates(list(ROW_KEY), keep="last").reset_index(drop=True)


def scaling_metrics() -> dict[str, str]:
    """{suite: metric} of the suites whose primary metric is plotted and fit against N (time
    and memory among the built-ins)."""
    return {suite: metric.name for suite, metric in scaling_suites().items()}


def params_of(raw: str) -> dict:
    """The params JSON of a row as a dict (empty when blank or unreadable)."""
    try:
        value = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def is_floor(df: pd.DataFrame) -> pd.Series:
    """Rows carrying exact softmax's own low-precision error, not a variant's."""
    return df["metric"] == FLOOR


def ok_values(df: pd.DataFrame, suite: str, metric: str) -> pd.DataFrame:
    """The ok rows of one suite and metric that carry a value, floor rows excluded."""
    sel = (df["suite"] == suite) & (df["metric"] == metric) & (df["status"] == "ok")
    out = df[sel & ~is_floor(df)]
    return out[out["value"].notna()]


def variant_order(df: pd.DataFrame) -> list[str]:
    """Variant labels sorted by family (registry order) then label: a stable legend order."""
    pairs = df.loc[~is_floor(df), ["family", "variant"]].drop_duplicates()
    pairs = sorted(pairs.itertuples(index=False), key=lambda p: (family_rank(p[0]), p[1]))
    return list(dict.fromkeys(p[1] for p in pairs))


def baseline_values(
    df: pd.DataFrame, suite: str, metric: str, baseline: str = BEST
) -> pd.DataFrame:
    """Per case (CASE_COLS), the baseline's value: a variant label, or `BEST` for the best exact.

    The best exact kernel is, per case, the ok softmax-family variant with the lowest value
    (fastest for time, leanest for memory), among those whose accuracy rows at that shape (if
    the run has any) are all within their limits. Returns CASE_COLS plus `value` (NaN when the
    baseline has no ok row), `winner` (the variant that gave it) and `oom` (no ok row, and
    the baseline, or for BEST some softmax variant, ran out of memory there).
    """
    rows = df[(df["suite"] == suite) & (df["metric"] == metric) & ~is_floor(df)]
    mine = rows["family"] == "softmax" if baseline == BEST else rows["variant"] == baseline
    rows = rows[mine]
    if baseline == BEST:
        wrong = inexact_shapes(df).assign(_wrong=True)
        rows = rows.merge(wrong, on=list(wrong.columns[:-1]), how="left")
        rows = rows[rows["_wrong"].isna()].drop(columns="_wrong")
    ok = rows[(rows["status"] == "ok") & rows["value"].notna()]
    if not ok.empty:
        ok = ok.loc[ok.groupby(list(CASE_COLS))["value"].idxmin()]
    best = ok[[*CASE_COLS, "value", "variant"]].rename(columns={"variant": "winner"})
    oom = rows.loc[rows["status"] == "oom", list(CASE_COLS)].drop_duplicates().assign(oom=True)
    out = best.merge(oom, on=list(CASE_COLS), how="outer")
    out["oom"] = out["oom"].eq(True) & out["value"].isna()
    return out.reset_index(drop=True)


def inexact_shapes(df: pd.DataFrame) -> pd.DataFrame:
    """(variant, CONFIG, causal, seq_len) where an accuracy row of the variant, output or
    gradients, is `inexact`, `error` or `nan`: there it is no exact baseline."""
    cols = ["variant", *CONFIG, "causal", "seq_len"]
    bad = df[(df["suite"] == "accuracy") & df["status"].isin(NOT_EXACT)]
    return bad[cols].drop_duplicates()


def config_name(config: tuple) -> str:
    """A short file-safe name for one CONFIG tuple, e.g. `cuda-bf16-b1-h16-d64`, with the input
    source appended unless it is randn (`cpu-fp32-b6-h12-d32-minilm`)."""
    device, dtype, batch, heads, head_dim, inputs = config
    name = f"{device}-{dtype}-b{batch}-h{heads}-d{head_dim}"
    return name if inputs == RANDN else f"{name}-{re.sub(r'[^A-Za-z0-9._-]+', '_', inputs)}"
