"""The tidy results file: one row per measurement, appended as each case finishes."""
from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from harness.suite import metric_unit

COLUMNS = (
    "run_id", "variant", "family", "params", "observed", "suite", "mode", "batch", "heads",
    "seq_len", "head_dim", "dtype", "causal", "device", "inputs", "seed", "metric", "value",
    "unit", "status", "reason",
)  # fmt: skip
# Columns a results file may lack (written before they existed), with the value they then mean.
# `seed`: a trained task's seed; empty for the other suites (their seed is meta's config.seed).
OPTIONAL_COLUMNS = {"observed": "{}", "inputs": "randn", "seed": ""}
# The columns that identify one case; a resumed run skips cases whose key is already written.
CASE_KEY = (
    "variant", "suite", "mode", "batch", "heads", "seq_len", "head_dim", "dtype", "causal",
    "inputs", "seed",
)  # fmt: skip
# `inexact`: a measured value beyond the limit its suite states (the value is kept).
STATUSES = ("ok", "oom", "skipped", "error", "nan", "timeout", "inexact")
INT_CELLS = ("batch", "heads", "seq_len", "head_dim")
BOOL_CELLS = ("true", "false", "1", "0")
RESULTS_FILE = "results.csv"
META_FILE = "meta.json"
# Per-head values of captured inputs (batch index = layer): one row per (case, layer, head).
DETAILS_FILE = "heads.csv"
DETAIL_COLUMNS = (
    "run_id", "variant", "inputs", "dtype", "device", "causal", "seq_len", "layer", "head",
    "rel_err_vs_softmax", "rel_err_softmax_floor",
)  # fmt: skip


class ResultsError(ValueError):
    """A results file that is missing, malformed or from another schema (one-line message)."""


@dataclass(frozen=True)
class Case:
    """One measurement case: a variant configuration at one shape, in one suite and mode."""

    variant: str
    family: str
    params: str
    suite: str
    mode: str
    batch: int
    heads: int
    seq_len: int
    head_dim: int
    dtype: str
    causal: bool
    device: str
    inputs: str = "randn"
    seed: int | str = ""

    @property
    def key(self) -> tuple:
        return tuple(str(getattr(self, c)) for c in CASE_KEY)


@dataclass
class Row:
    """A result row: the case, one metric and the status it ended with.

    `observed` holds facts of the run that are not configuration (the SDPA backend that ran,
    the reference rows compared, a kernel's chosen launch configuration): the CSV's `observed`
    column, a JSON object beside `params`.
    """

    case: Case
    metric: str
    value: float | None
    status: str = "ok"
    reason: str = ""
    observed: dict = field(default_factory=dict)
    # Per-head values the case's suite reported (captured inputs), for `heads.csv`; a case's
    # first row carries them.
    details: list[dict] = field(default_factory=list)

    def as_dict(self, run_id: str) -> dict:
        d = asdict(self.case)
        d.update(run_id=run_id, observed=json.dumps(self.observed, sort_keys=True, default=str), metric=self.metric, value=self.value,
                 unit=metric_unit(self.metric), status=self.status, reason=self.reason)
        return {c: d[c] for c in COLUMNS}


class ResultsWriter:
    """Appends rows to `results.csv`, flushing after every case so a crash loses nothing."""

    def __init__(self, run_dir: Path, run_id: str):
        self.path = Path(run_dir) / RESULTS_FILE
        self.run_id = run_id
        new = not self.path.exists() or self.path.stat().st_size == 0
        if not new:
            upgrade_columns(self.path)
        self._file = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=COLUMNS, lineterminator="\n")
        if new:
            self._writer.writeheader()
            self._file.flush()

    def write(self, rows: Iterable[Row]) -> None:
        for row in rows:
            self._writer.writerow(row.as_dict(self.run_id))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class DetailsWriter:
    """Appends per-head rows to `heads.csv` (created on the first row), flushed per case."""

    def __init__(self, run_dir: Path, run_id: str):
        self.path = Path(run_dir) / DETAILS_FILE
        self.run_id = run_id
        self._file = None
        self._writer = None

    def write(self, case: Case, details: list[dict]) -> None:
        if not details:
            return
        if self._file is None:
            new = not self.path.exists() or self.path.stat().st_size == 0
            self._file = open(self.path, "a", newline="")
            self._writer = csv.DictWriter(self._file, fieldnames=DETAIL_COLUMNS, restval="")
            if new:
                self._writer.writeheader()
        base = {c: getattr(case, c) for c in DETAIL_COLUMNS if hasattr(case, c)}
        for detail in details:
            self._writer.writerow({**base, "run_id": self.run_id, **detail})
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def load_details(run_dir: str | Path) -> pd.DataFrame:
    """The per-head rows of a run (empty when it has none); the newest row of a repeated
    (variant, inputs, dtype, device, causal, seq_len, layer, head) wins."""
    path = Path(run_dir) / DETAILS_FILE
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame(columns=list(DETAIL_COLUMNS))
    df = pd.read_csv(path, keep_default_na=False, dtype={"variant": str, "inputs": str})
    for col in ("rel_err_vs_softmax", "rel_err_softmax_floor"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    df["causal"] = df["causal"].astype(str).str.lower().isin(["true", "1"])
    key = [c for c in DETAIL_COLUMNS[1:9]]
    return df.drop_duplicates(key, keep="last").reset_index(drop=True)


def load_results(path: str | Path) -> pd.DataFrame:
    """Load a results CSV (or a run directory holding one) into a DataFrame.

    Raises `ResultsError` with a one-line message when the file is missing, lacks columns, or
    has a cell that does not parse (naming the file, the line and the column).
    """
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise ResultsError(f"no results file at {path}")
    return typed_results(read_text_csv(path), path)


def read_text_csv(path: Path) -> pd.DataFrame:
    """Every cell as text (`keep_default_na=False`: the status "nan" is a word here, not a
    missing value); `ResultsError` in one line when it is no readable CSV."""
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ResultsError(f"{path} is not a readable CSV: {str(exc).splitlines()[0]}") from None


def read_table(path: Path, columns: tuple[str, ...], numeric: tuple[str, ...] = ()
               ) -> pd.DataFrame:
    """A side table of a run (e.g. dropin.csv): read, with `columns` present and the
    `numeric` ones numbers (empty cells allowed), else `ResultsError` in one line naming the
    file (and the line and column of a bad cell)."""
    df = read_text_csv(path)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ResultsError(f"{path} lacks the column(s) {', '.join(missing)}")
    check_column_cells(df, path, {col: (_is_float_or_empty, "is not a number")
                                  for col in numeric})
    for col in numeric:
        df[col] = pd.to_numeric(df[col], errors="coerce")
    return df


def typed_results(df: pd.DataFrame, path: str | Path) -> pd.DataFrame:
    """Results read as text (`dtype=str, keep_default_na=False`), checked and typed as
    `load_results` returns them; `path` names the source in errors."""
    missing = [c for c in COLUMNS if c not in df.columns and c not in OPTIONAL_COLUMNS]
    if missing:
        raise ResultsError(f"{path} is not an attnbench results file: missing {', '.join(missing)}")
    check_cells(df, path)
    for col, value in OPTIONAL_COLUMNS.items():
        if col not in df.columns:
            df.insert(COLUMNS.index(col), col, value)
    df["value"] = pd.to_numeric(df["value"], errors="coerce")
    for col in INT_CELLS:
        df[col] = df[col].astype(int)
    df["causal"] = df["causal"].str.strip().str.lower().isin(["true", "1"])
    return df


def check_cells(df: pd.DataFrame, path: Path) -> None:
    """Raise `ResultsError` at the first cell of value, status, causal or a size column that
    does not parse: `file:line: column 'value': 'abc' is not a number`."""
    check_column_cells(df, path, {
        "value": (_is_float_or_empty, "is not a number"),
        "status": (lambda c: c in STATUSES, f"is not a status ({', '.join(STATUSES)})"),
        "causal": (lambda c: c.strip().lower() in BOOL_CELLS, "is not True or False"),
        **{col: (_is_positive_int, "is not a positive integer") for col in INT_CELLS},
    })


def check_column_cells(df: pd.DataFrame, path: Path, checks: dict) -> None:
    """`checks`: {column: (cell -> ok, what a bad cell is)}; `ResultsError` at the first bad
    cell, naming the file, its line and the column."""
    for col, (ok, problem) in checks.items():
        bad = ~df[col].map(ok)
        if bad.any():
            i = int(bad.to_numpy().argmax())
            line = i + 2  # line 1 is the header
            raise ResultsError(f"{path}:{line}: column '{col}': {df[col].iloc[i]!r} {problem}")


def _is_float_or_empty(cell: str) -> bool:
    if cell.strip() == "":
        return True
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _is_positive_int(cell: str) -> bool:
    try:
        return int(cell) >= 1
    except ValueError:
        return False
def upgrade_columns(path: Path) -> None:
    """Rewrite a results file whose header lacks an optional column, adding that column with
    the value it means, so that rows appended in today's column order line up."""
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    if all(c in header for c in COLUMNS):
        return
    load_results(path).to_csv(path, index=False, columns=list(COLUMNS))


def cut_partial_line(path: Path) -> int:
    """Drop a last line left unfinished by a killed process, so that appending stays valid;
    returns the number of bytes dropped (0 when the file ends in a complete line)."""
    if not path.is_file():
        return 0
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    return len(data) - end


def cut_unfinished_case(path: Path) -> int:
    """Drop a last line left unfinished by a killed run and the complete rows before it of the
    same case (a case's rows are written together: its other rows may be missing), so that the
    case runs again; returns the number of rows dropped, the unfinished one included."""
    if not cut_partial_line(path):
        return 0
    lines = path.read_bytes().splitlines(keepends=True)
    if len(lines) < 2:
        return 1
    header = next(csv.reader([lines[0].decode()]))
    where = [header.index(c) for c in CASE_KEY if c in header]

    def case_of(line: bytes) -> list[str]:
        cells = next(csv.reader([line.decode()]))
        return [cells[i] if i < len(cells) else "" for i in where]

    last, keep = case_of(lines[-1]), len(lines)
    while keep > 1 and case_of(lines[keep - 1]) == last:
        keep -= 1
    with open(path, "r+b") as f:
        f.truncate(sum(map(len, lines[:keep])))
    return 1 + len(lines) - keep


def load_existing(run_dir: Path) -> pd.DataFrame:
    """The rows already written in `run_dir` (an empty frame if there is no results file)."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame(columns=list(COLUMNS))
    return load_results(path)


def finished_case_keys(df: pd.DataFrame) -> set[tuple]:
    """Keys of the cases in `df` (rows already written), as `Case.key` spells them."""
    return {tuple(str(v) for v in key) for key in df[list(CASE_KEY)].itertuples(index=False)}


def write_meta(run_dir: Path, meta: dict) -> None:
    """Write `meta.json` (environment fingerprint, command line, measured roofline)."""
    (Path(run_dir) / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def read_meta(run_dir: Path) -> dict:
    """Read a run's `meta.json`; an empty dict when absent."""
    path = Path(run_dir) / META_FILE
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResultsError(f"{path} is not valid JSON: {str(exc).splitlines()[0]}") from None
    if not isinstance(meta, dict):
        raise ResultsError(f"{path} is not a JSON object")
    return meta
