"""pytest-benchmark JSON files of `benchmarks/test_speed.py` read as runs: each benchmark's case
and measurements (its `extra_info`) become tidy rows, its machine info the run's meta."""
from __future__ import annotations

import json
from dataclasses import MISSING, fields
from pathlib import Path

import pandas as pd

from harness.reports.data import Run, load_run, tidy
from harness.results import COLUMNS, Case, ResultsError
from harness.suite import metric_unit

# extra_info keys that are measurements, with the suite whose rows they are.
MEASUREMENTS = {
    **{m: "time" for m in ("time_ms", "time_ms_p20", "time_ms_p80", "tflops", "gbps",
                           "roofline_frac")},
    "peak_mem_mib": "memory",
}  # fmt: skip
MACHINE_KEYS = ("gpu", "driver", "cuda", "torch", "triton")
# Case fields a benchmark must record; the others (inputs, seed) take their defaults.
CASE_DEFAULTS = {f.name: f.default for f in fields(Case) if f.default is not MISSING}
CASE_FIELDS = {f.name for f in fields(Case)} - set(CASE_DEFAULTS)


def load_compared(path: str | Path) -> Run:
    """A run from a results CSV or run directory, or from a pytest-benchmark JSON file."""
    path = Path(path)
    return load_benchmark_json(path) if path.suffix == ".json" else load_run(path)


def load_benchmark_json(path: Path) -> Run:
    """The run a pytest-benchmark JSON file of `benchmarks/test_speed.py` holds.

    Raises `ResultsError` (one line) for a file that is missing, not JSON, not pytest-benchmark
    output, or holds a benchmark without the case that test_speed.py records.
    """
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ResultsError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResultsError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ResultsError(f"{path} is not a pytest-benchmark JSON file (no 'benchmarks' list)")
    run_id = path.stem
    rows = []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info") if isinstance(bench, dict) else None
        case = (info or {}).get("case")
        if not isinstance(case, dict) or not CASE_FIELDS <= set(case):
            name = bench.get("name") if isinstance(bench, dict) else bench
            raise ResultsError(f"{path}: benchmark {name!r} has no attnbench case in its "
                               "extra_info; compare reads files of benchmarks/test_speed.py")
        for metric, suite in MEASUREMENTS.items():
            if isinstance(info.get(metric), (int, float)):
                rows.append({**CASE_DEFAULTS, **case, "run_id": run_id, "suite": suite,
                             "metric": metric,
                             "observed": json.dumps(info.get("observed") or {}, sort_keys=True),
                             "value": float(info[metric]), "unit": metric_unit(metric),
                             "status": "ok", "reason": ""})
    if not rows:
        raise ResultsError(f"{path} holds no benchmark measurements")
    df = tidy(pd.DataFrame(rows, columns=list(COLUMNS)))
    machine = data.get("machine_info") if isinstance(data.get("machine_info"), dict) else {}
    meta = {"run_id": run_id, "device": ",".join(sorted(df["device"].unique())),
            **{key: machine.get(key) for key in MACHINE_KEYS}}
    return Run(dir=path.parent, df=df, meta=meta)
