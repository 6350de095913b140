"""Per-head accuracy on captured inputs: each (layer, head)'s relative error against exact
softmax, and its summaries over heads.

Captured q, k, v hold one model layer per batch index (`harness.inputs`), so the error of
batch index b, head h is the error of layer b, head h.
"""
from __future__ import annotations

import torch

from harness.trial import Trial

SUMMARIES = {"median": 0.5, "p90": 0.9, "max": 1.0}


def head_errors(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`[B, H]` Frobenius ||out - ref|| / ||ref|| of each (batch, head) slice, in float64."""
    diff = torch.linalg.vector_norm(out.double() - ref, dim=(-2, -1))
    return diff / torch.linalg.vector_norm(ref, dim=(-2, -1))


def summaries(name: str, errors: torch.Tensor) -> dict[str, float]:
    """`{name}_head_median`, `_head_p90`, `_head_max` of `errors` over every (layer, head)."""
    flat = errors.flatten()
    return {f"{name}_head_{label}": float(torch.quantile(flat, q))
            for label, q in SUMMARIES.items()}


def per_head_metrics(trial: Trial, out: torch.Tensor, exact: torch.Tensor,
                     low: torch.Tensor | None) -> dict[str, float]:
    """Summaries over heads of the variant's error (and of exact attention's low-precision
    floor, when `low` is given); the per-head values go to `trial.details`."""
    errors = head_errors(out, exact)
    metrics = summaries("rel_err_vs_softmax", errors)
    floor = head_errors(low, exact) if low is not None else None
    if floor is not None:
        metrics.update(summaries("rel_err_softmax_floor", floor))
    for b in range(errors.shape[0]):
        for h in range(errors.shape[1]):
            detail = {"layer": b, "head": h, "rel_err_vs_softmax": float(errors[b, h])}
            if floor is not None:
                detail["rel_err_softmax_floor"] = float(floor[b, h])
            trial.details.append(detail)
    return metrics
