"""The files of a sharded run, and their merge into one results.csv, heads.csv and meta.json.

Each process writes into its own directory, `shards/rank-I/` (results.csv, heads.csv, its
worker.log and rank.json: host, GPU, calibration), so processes never write the same file.
Every process merges when it ends, under a lock (`shards/.lock`): the run's results.csv
becomes every row written so far, one row per (case, metric), sorted as a single process
writes them (the sweep's case order); per-process records join meta.json. When every case of
the sweep is in results.csv, the per-process rows and records are removed: the run directory
then reads like a single-process one, plus meta.json's `sharding` record. No process waits on
another: the last to end completes the merge. A run whose process died is completed by
`--resume` (sharded or not: a whole-run resume is the one process of its own share), which
reads every process's rows and merges at its end.
"""
from __future__ import annotations

import csv
import fcntl
import io
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from harness.calibration import calibration_summary
from harness.results import CASE_KEY, COLUMNS, DETAIL_COLUMNS, DETAILS_FILE, META_FILE
from harness.results import OPTIONAL_COLUMNS, RESULTS_FILE, read_meta, typed_results

SHARDS_DIR = "shards"
RANK_FILE = "rank.json"
LOCK_FILE = ".lock"


def rank_dir(run_dir: Path, index: int) -> Path:
    return Path(run_dir) / SHARDS_DIR / f"rank-{index}"


def rank_dirs(run_dir: Path) -> list[Path]:
    """Every process directory of the run, by index."""
    root = Path(run_dir) / SHARDS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.glob("rank-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def has_parts(run_dir: Path) -> bool:
    """Whether per-process rows or records wait to be merged."""
    return any((d / name).exists() for d in rank_dirs(run_dir)
               for name in (RESULTS_FILE, DETAILS_FILE, RANK_FILE))


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run's lock (one process at a time reads and writes the shared files)."""
    path = Path(run_dir) / SHARDS_DIR / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_rows(path: Path, columns: tuple[str, ...]) -> list[dict]:
    """The complete lines of a CSV as text cells (an unfinished last line is left out)."""
    if not path.is_file():
        return []
    text = path.read_text()
    text = text[:text.rfind("\n") + 1]
    rows = list(csv.DictReader(io.StringIO(text)))
    defaults = {c: OPTIONAL_COLUMNS.get(c, "") for c in columns}
    return [{**defaults, **{c: r[c] for c in columns if r.get(c) is not None}} for r in rows]


def results_paths(run_dir: Path) -> list[Path]:
    """results.csv, then each process directory's."""
    return [Path(run_dir) / RESULTS_FILE, *(d / RESULTS_FILE for d in rank_dirs(run_dir))]


def all_rows(run_dir: Path) -> list[dict]:
    """The rows of every results file of the run (text cells)."""
    return [row for path in results_paths(run_dir) for row in read_rows(path, COLUMNS)]


def existing_rows(run_dir: Path) -> pd.DataFrame:
    """Every row written in the run so far, typed as `harness.results.load_results` returns
    them (a malformed cell is a `ResultsError` naming its file and line)."""
    frames = [typed_results(pd.DataFrame(read_rows(path, COLUMNS), columns=list(COLUMNS),
                                         dtype=str), path) for path in results_paths(run_dir)]
    return pd.concat(frames, ignore_index=True)


def case_key(row: dict) -> tuple:
    return tuple(row[c] for c in CASE_KEY)


@dataclass(frozen=True)
class Merged:
    """What a merge found: every case of the sweep written (`complete`) and whether it moved
    per-process rows into results.csv (`folded`)."""

    complete: bool
    folded: bool


def merge(run_dir: Path, order: list[tuple]) -> Merged:
    """Merge the per-process files of `run_dir` into results.csv, heads.csv and meta.json.

    `order` lists the sweep's case keys in the order a single process runs them. Per-process
    files are removed once every case is written.
    """
    run_dir = Path(run_dir)
    with run_lock(run_dir):
        parts = has_parts(run_dir)
        rows = dedupe(all_rows(run_dir), lambda r: (*case_key(r), r["metric"]))
        position = {key: i for i, key in enumerate(order)}
        rows.sort(key=lambda r: position.get(case_key(r), len(order)))
        write_csv(run_dir / RESULTS_FILE, COLUMNS, rows)
        merge_details(run_dir, order)
        merge_records(run_dir)
        complete = set(order) <= {case_key(r) for r in rows}
        if parts and complete:
            for d in rank_dirs(run_dir):
                for name in (RESULTS_FILE, DETAILS_FILE, RANK_FILE):
                    (d / name).unlink(missing_ok=True)
                if not any(d.iterdir()):  # a worker.log stays
                    d.rmdir()
    return Merged(complete, parts)


def dedupe(rows: list[dict], key) -> list[dict]:
    """One row per key, the last one written, at the place of the last."""
    kept: dict[tuple, dict] = {}
    for row in rows:
        kept.pop(key(row), None)
        kept[key(row)] = row
    return list(kept.values())


def merge_details(run_dir: Path, order: list[tuple]) -> None:
    """heads.csv: the per-head rows of results' and the processes' files, in case order."""
    paths = [run_dir / DETAILS_FILE, *(d / DETAILS_FILE for d in rank_dirs(run_dir))]
    rows = [row for path in paths for row in read_rows(path, DETAIL_COLUMNS)]
    if not rows:
        return
    by = ("variant", "inputs", "dtype", "causal", "seq_len")
    position: dict[tuple, int] = {}
    for i, key in enumerate(order):
        case = dict(zip(CASE_KEY, key))
        position.setdefault(tuple(case[c] for c in by), i)
    rows = dedupe(rows, lambda r: tuple(r[c] for c in DETAIL_COLUMNS[1:9]))
    rows.sort(key=lambda r: position.get(tuple(r[c] for c in by), len(order)))
    write_csv(run_dir / DETAILS_FILE, DETAIL_COLUMNS, rows)


def write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    """Replace `path` at once (a reader sees the old file or the new, never half of one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def merge_records(run_dir: Path) -> None:
    """Add the processes' rank.json records to meta.json's `sharding` record."""
    meta = read_meta(run_dir)
    if not meta:
        return
    sharding = meta.setdefault("sharding", {})
    ranks = sharding.setdefault("ranks", [])
    for d in rank_dirs(run_dir):
        path = d / RANK_FILE
        if path.is_file():
            record = json.loads(path.read_text())
            if record not in ranks:
                ranks.append(record)
    ranks.sort(key=lambda r: (r.get("started", ""), r.get("rank", 0)))
    sharding["calibration"] = calibration_summary(ranks)
    write_json(run_dir / META_FILE, meta)


def write_record(run_dir: Path, index: int, record: dict) -> None:
    write_json(rank_dir(run_dir, index) / RANK_FILE, record)
