"""The accuracy suite (SPEC 2): fidelity to the variant's own float64 reference, and
approximation of exact softmax attention, on the same inputs."""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from harness.registry import get_variant
from harness.trial import Trial
from suites.realinputs import per_head_metrics
from variants.softmax import softmax_rows_reference

LOW_PRECISION = (torch.bfloat16, torch.float16)


def sampled_rows(n: int, limit: int, seed: int, device: torch.device) -> torch.Tensor | None:
    """All rows (None) when `n <= limit`, else `limit` seeded distinct query rows, sorted."""
    if n <= limit:
        return None
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(n, generator=gen)[:limit].sort().values.to(device)


def reference_output(trial: Trial, q64, k64, v64) -> torch.Tensor:
    """The float64 output of the variant's reference math (its declared `reference`)."""
    spec = get_variant(trial.variant.spec.reference or trial.variant.spec.name)
    params = {k: v for k, v in trial.variant.params.items() if k in spec.params}
    ref_fn = spec.factory(replace(trial.shape, dtype=torch.float64), **params)
    if isinstance(ref_fn, nn.Module):
        ref_fn = ref_fn.to(device=q64.device, dtype=torch.float64)
        if isinstance(trial.fn, nn.Module):  # same learnable weights as the measured variant
            ref_fn.load_state_dict(trial.fn.state_dict())
    with torch.no_grad():
        return ref_fn(q64, k64, v64)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Frobenius ||out - ref|| / ||ref|| in float64."""
    return float(torch.linalg.vector_norm(out.double() - ref) / torch.linalg.vector_norm(ref))


def run_accuracy(trial: Trial, mode: str) -> dict[str, float]:
    """rel_err_vs_reference, max_abs_err_vs_reference and rel_err_vs_softmax.

    At lengths above `config.accuracy_rows` the comparison uses that many seeded query rows
    (each exact at O(N D) cost); the count is recorded as `ref_rows` in the row's params.
    For bf16/fp16 inputs `rel_err_softmax_floor` gives exact attention's own error at that
    precision on the same rows: the floor an approximation should be judged against.
    """
    q, k, v = trial.inputs
    n = trial.shape.seq_len
    rows = sampled_rows(n, trial.config.accuracy_rows, trial.config.seed, trial.device)
    index = rows if rows is not None else torch.arange(n, device=trial.device)
    pick = (lambda t: t) if rows is None else (lambda t: t[:, :, rows])

    out = pick(trial.forward())
    q64, k64, v64 = (t.double() for t in trial.inputs)
    exact = softmax_rows_reference(q64, k64, v64, index, trial.shape.causal)
    if get_variant(trial.variant.spec.reference or trial.variant.spec.name).family == "softmax":
        ref = exact
    else:
        ref = pick(reference_output(trial, q64, k64, v64))

    metrics = {
        "rel_err_vs_reference": relative_error(out, ref),
        "max_abs_err_vs_reference": float((out.double() - ref).abs().max()),
        "rel_err_vs_softmax": relative_error(out, exact),
    }
    low = None
    if trial.shape.dtype in LOW_PRECISION:
        low = softmax_rows_reference(q, k, v, index, trial.shape.causal)
        metrics["rel_err_softmax_floor"] = relative_error(low, exact)
    if trial.inputs_name != "randn":  # captured inputs: per (layer, head), suites.realinputs
        metrics.update(per_head_metrics(trial, out, exact, low))
    if rows is not None:
        trial.extra_params["ref_rows"] = len(rows)
    return metrics
