"""One identical case every process of a sharded run times before its own cases.

Exact attention (PyTorch's `scaled_dot_product_attention`, forward) at a fixed shape and seed,
timed like any case. The spread of its median across the processes (slowest over fastest,
minus one) says how far the GPUs, or the hosts, of the run differ in speed; `compare` warns
when it exceeds the comparison threshold, since a difference between two cases may then come
from the GPU each ran on.
"""
from __future__ import annotations

import torch

from harness.timing import time_closure

SHAPES = {  # (batch, heads, seq_len, head_dim, dtype) per device type
    "cuda": (1, 16, 4096, 64, torch.bfloat16),
    "cpu": (1, 2, 256, 32, torch.float32),
}
REP_MS = {"cuda": 100.0, "cpu": 20.0}


def describe(device_type: str) -> str:
    b, h, n, d, dtype = SHAPES[device_type]
    return f"sdpa forward B={b} H={h} N={n} D={d} {str(dtype).removeprefix('torch.')}"


def calibrate(device: torch.device) -> dict:
    """Time the calibration case on `device`: its description and median, p20, p80 in ms."""
    b, h, n, d, dtype = SHAPES[device.type]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to(device, dtype) for _ in range(3))

    def call():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    call()
    stats = time_closure(call, device, warmup_ms=REP_MS[device.type] / 4,
                         rep_ms=REP_MS[device.type])
    return {"case": describe(device.type), "time_ms": stats.median, "time_ms_p20": stats.p20,
            "time_ms_p80": stats.p80}


def spread(times_ms: list[float]) -> float | None:
    """Slowest over fastest, minus one (0.1: the slowest took 10% longer); None for fewer
    than two times."""
    if len(times_ms) < 2 or min(times_ms) <= 0:
        return None
    return max(times_ms) / min(times_ms) - 1


def calibration_summary(ranks: list[dict]) -> dict | None:
    """meta.json's calibration record from the per-process records that carry one."""
    timed = [r for r in ranks if r.get("calibration")]
    if not timed:
        return None
    times = [r["calibration"]["time_ms"] for r in timed]
    return {"case": timed[0]["calibration"]["case"], "spread": spread(times),
            "fastest_ms": min(times), "slowest_ms": max(times), "processes": len(timed)}


def spread_warnings(runs: dict, threshold: float) -> list[str]:
    """One line per run (name -> meta) whose calibration spread exceeds `threshold`."""
    out = []
    for which, meta in runs.items():
        summary = (meta.get("sharding") or {}).get("calibration") or {}
        value = summary.get("spread")
        if value is not None and value > threshold:
            out.append(f"the {which} run's {summary['processes']} processes differ by "
                       f"{value * 100:.1f}% on the calibration case ({summary['fastest_ms']:.4g}"
                       f" to {summary['slowest_ms']:.4g} ms), more than the "
                       f"{threshold * 100:g}% threshold: a case's change may come from the GPU "
                       f"that ran it")
    return out
