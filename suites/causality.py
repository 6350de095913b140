"""Causality check: does a causal variant's output depend on keys and values in its future?

A causal output at query i may read keys and values at positions <= i only. The check runs the
forward once more with every key and value from position N/2 on replaced by fresh random
values, and compares the first N/2 output rows, which must not move. `future_key_leak` is the
largest relative change of one such row: 0 for a causal variant (or rounding, of the order of
the dtype's epsilon), a sizeable fraction for one that attends to even one future key.
"""
from __future__ import annotations

import torch

from harness.failures import Failure
from harness.trial import Trial

METRIC = "future_key_leak"


def leak_tolerance(dtype: torch.dtype) -> float:
    """The largest row change taken as rounding: a causal kernel that sums in another order
    when later values change (e.g. a prefix sum by subtraction) moves early rows by a few eps;
    a row that reads one future key among a few dozen moves by a tenth or more."""
    return max(1e-2, 8 * torch.finfo(dtype).eps)


def future_key_leak(trial: Trial) -> float:
    """The largest relative change of an output row in [0, N/2) when only the keys and values
    at [N/2, N) change."""
    q, k, v = trial.inputs
    n = trial.shape.seq_len
    split = n // 2
    if split < 1:
        return 0.0
    gen = torch.Generator(device="cpu").manual_seed(trial.config.seed + 7)
    k2, v2 = k.clone(), v.clone()
    for t in (k2, v2):
        fresh = torch.randn(t[:, :, split:].shape, generator=gen).to(t)
        t[:, :, split:] = fresh
    with torch.no_grad():
        torch.manual_seed(trial.config.seed)
        before = trial.fn(q, k, v)[:, :, :split].double()
        torch.manual_seed(trial.config.seed)
        after = trial.fn(q, k2, v2)[:, :, :split].double()
    change = torch.linalg.vector_norm(after - before, dim=-1)
    scale = torch.linalg.vector_norm(before, dim=-1).clamp_min(torch.finfo(torch.float64).tiny)
    return float((change / scale).max())


def check_causal(trial: Trial) -> dict[str, float]:
    """For a causal trial, `{future_key_leak: value}`; raises `Failure("error", ...)` when the
    output reads future keys. Non-causal trials: no metric."""
    if not trial.shape.causal:
        return {}
    leak, tolerance = future_key_leak(trial), leak_tolerance(trial.shape.dtype)
    if not leak <= tolerance:  # NaN counts as a leak
        raise Failure("error", f"not causal: {METRIC}={leak:.3g} > {tolerance:.3g} (outputs "
                               f"before N/2 changed when only keys/values after it changed)")
    return {METRIC: leak}
