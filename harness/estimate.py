"""A rough estimate of how long a CPU sweep takes, from its cases' FLOP counts.

Each case is costed as the calls its suite says it makes (`Suite.cost`: e.g. time, a warm-up
plus the larger of the time budget and the minimum sample count; memory, two calls) at the rate
this CPU reaches on a small exact attention in the run's dtype (which, unlike a bare matmul,
includes the softmax and memory traffic attention spends its time on). Triton kernels on the
CPU run in the interpreter, costed at a fixed slowdown. Good to a factor of a few: enough to
warn before a sweep that would take hours.
"""
from __future__ import annotations

import os
import time

import torch

from harness.suite import CaseCost, get_suite
from harness.trial import MODE_FACTOR

WARN_SECONDS = 600.0
INTERPRETER_SLOWDOWN = 200.0  # Triton interpreter vs a PyTorch matmul of the same FLOPs
PREPARE_S = 0.05  # building a variant, per shape
CALL_S = 5e-4  # the least a call costs: Python, dispatch and allocation


def attention_gflops(dtype: torch.dtype, n: int = 512, heads: int = 4, dim: int = 64) -> float:
    """This CPU's rate (GFLOP/s) on exact softmax attention of a small shape in `dtype`."""
    q = torch.randn(1, heads, n, dim).to(dtype)

    def attend():
        return torch.softmax(q @ q.transpose(-1, -2) * dim**-0.5, dim=-1) @ q

    attend()
    start, calls = time.perf_counter(), 0
    while calls < 2 or time.perf_counter() - start < 0.05:
        attend()
        calls += 1
    return 4.0 * heads * n * n * dim * calls / (time.perf_counter() - start) / 1e9


def case_flops(vc, shape, mode: str) -> float:
    """FLOPs of one call of `mode`: the variant's own count, or exact attention's."""
    count = vc.spec.flops(shape, vc.params) if vc.spec.flops else 4.0 * shape.numel * shape.seq_len
    return count * MODE_FACTOR[mode]


def interpreted(vc) -> bool:
    return "triton" in vc.spec.requires or vc.spec.name.endswith("_triton")


def prepare_seconds(vc, shape, rate: float) -> float:
    """Rough seconds to build a variant for `shape` and make its first call, at `rate`
    FLOP/s."""
    return PREPARE_S + CALL_S + case_flops(vc, shape, "fwd") / rate


def case_seconds(config, vc, shape, inputs: str, mode: str, suite: str, rate: float,
                 fp64_rate: float) -> float:
    """Rough seconds one case of `suite` takes, as the suite costs it (`Suite.cost`) from
    calls at `rate` FLOP/s and float64 references at `fp64_rate`."""
    def call_s(call_mode: str) -> float:
        return CALL_S + case_flops(vc, shape, call_mode) / rate

    def fp64_s(call_mode: str) -> float:
        return CALL_S + case_flops(vc, shape, call_mode) / fp64_rate

    return get_suite(suite).cost(CaseCost(config, inputs, shape, mode, call_s, fp64_s))


def estimate_seconds(sweep) -> float:
    """Rough seconds the unfinished cases of `sweep` (a `harness.runner.Sweep`) will take."""
    config = sweep.config
    rates = {config.dtype: attention_gflops(config.torch_dtype),
             "fp64": attention_gflops(torch.float64)}
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    total = 0.0
    for name, shape in sweep.problems():
        for vc in sweep.configs:
            spec = vc.spec
            if (spec.unavailable_reason(sweep.device, vc.params)
                    or spec.unsupported_reason(shape, vc.params)):
                continue
            todo = sweep.cases_for(vc, shape, name)
            if not todo:
                continue
            slow = INTERPRETER_SLOWDOWN if interpret and interpreted(vc) else 1.0
            rate = rates[config.dtype] * 1e9 / slow
            total += prepare_seconds(vc, shape, rate)
            total += sum(case_seconds(config, vc, shape, name, case.mode, suite, rate,
                                      rates["fp64"] * 1e9) for case, suite in todo)
    return total


def describe(seconds: float) -> str:
    """'40 s', '12 min', '3.5 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def size_warning(sweep) -> str | None:
    """One line when a CPU sweep is likely to take longer than `WARN_SECONDS`, else None."""
    if sweep.device.type != "cpu":
        return None
    cases = sweep.total_cases()
    seconds = estimate_seconds(sweep)
    if seconds < WARN_SECONDS:
        return None
    return (f"warning: {cases} cases, roughly {describe(seconds)} on this CPU (a rough "
            "estimate); shrink the sweep with --seq-lens, --heads, --variant, --suite or --mode, "
            "or use a GPU")
