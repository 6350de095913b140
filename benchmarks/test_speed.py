"""Speed of every registered variant through pytest-benchmark, for regression gates in CI.

One test per (variant, length, mode, causal) chosen by the `--attn-*` options
(benchmarks/conftest.py), selectable with `-k` (ids such as `window_triton-N1024-fwd-causal`)
and `-m` (family, mode, `causal` / `noncausal`). On CUDA each call is timed by the harness's
CUDA events with L2 flushed before it (`harness.timing.EventClock`, the time suite's
measurement) as pytest-benchmark's timer, in pedantic mode with the sample counts the time
suite uses, so that pytest-benchmark's calibration never judges the device by the host clock.
On the CPU pytest-benchmark times and calibrates as usual. Each benchmark's `extra_info` holds
the case, what was observed (`backend_ran`), `time_ms` with `time_ms_p20` / `time_ms_p80`,
GB/s, TFLOP/s, the roofline fraction (CUDA) and the peak extra memory of one call:
`run_bench.py compare` reads the saved JSON.
"""
from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from benchmarks.conftest import bench_config, case_marks, speed_cases
from harness.failures import Failure
from harness.runner import make_case
from harness.timing import EventClock, one_call_ms, sample_counts
from suites.memory import run_memory
from suites.time import rates

CLOCK = EventClock()  # pytest-benchmark's timer for CUDA cases


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    bench = bench_config(metafunc.config)
    timer = [pytest.mark.benchmark(timer=CLOCK.now)] if bench.device == "cuda" else []
    cases = speed_cases(bench)
    metafunc.parametrize("case", [pytest.param(c, id=c.id, marks=[*case_marks(c), *timer])
                                  for c in cases])


def test_speed(benchmark, case, attn_runner):
    try:
        trial = attn_runner.prepare(case.variant, case.shape, case.inputs)
    except Failure as failure:
        if failure.status == "skipped":
            pytest.skip(failure.reason)
        raise
    fn, grads = trial.closure(case.mode)
    fn()  # compilation and autotuning stay outside timing
    if trial.device.type == "cuda":
        cfg = trial.config
        warmup, rounds = sample_counts(one_call_ms(fn, grads), cfg.warmup_ms, cfg.rep_ms,
                                       cfg.min_samples)
        benchmark.pedantic(CLOCK.timed(fn, grads), rounds=rounds, warmup_rounds=warmup)
    else:
        def call():
            for t in grads:
                t.grad = None
            fn()

        benchmark(call)
    if benchmark.stats is None:  # --benchmark-disable: each case ran once, as a plain test
        return
    seconds = torch.tensor(benchmark.stats.stats.data, dtype=torch.float64)
    p20, median, p80 = (torch.quantile(seconds * 1e3, torch.tensor([0.2, 0.5, 0.8],
                                                                   dtype=torch.float64)))
    median = float(median)
    identity = make_case(case.variant, case.shape, "time", case.mode, trial.device.type,
                         case.inputs)
    benchmark.extra_info.update(
        case=asdict(identity), observed=dict(trial.built), time_ms=median,
        time_ms_p20=float(p20), time_ms_p80=float(p80),
        **rates(trial, case.mode, median), **run_memory(trial, case.mode),
    )  # fmt: skip
    benchmark.extra_info.setdefault("roofline_frac", None)  # measured on CUDA only
    benchmark.extra_info.setdefault("tflops", None)  # variants that count their FLOPs
