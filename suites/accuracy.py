"""The accuracy suite: fidelity to the variant's own float64 reference, in the forward output
and in every gradient, judged against the floor (the same reference math in the variant's
dtype), and approximation of exact softmax attention, on the same inputs.

`fwd` rows compare the output; `bwd` and `fwd_bwd` rows compare the gradients of q, k, v and
of the variant's learnable weights, through a seeded upstream gradient dO.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from harness.registry import EXACT, get_variant
from harness.suite import MODES, CaseCost, Metric, Summary, register_suite
from harness.trial import Trial
from suites.causality import METRIC as LEAK
from suites.causality import check_causal
from suites.realinputs import SUMMARIES, per_head_metrics

LOW_PRECISION = (torch.bfloat16, torch.float16)
# A gradient (or output) error more than FLOOR_FACTOR times its floor is flagged `inexact`.
# Floors below FLOOR_MIN (fp32 and fp64 math) count as FLOOR_MIN: there the bar is absolute.
FLOOR_FACTOR = 2.0
FLOOR_MIN = 1e-5
GRADIENTS = ("dq", "dk", "dv")
METRICS = (
    Metric("rel_err_vs_reference", "ratio"),
    Metric("rel_err_floor", "ratio"),
    Metric("floor_ratio", "x", limit=FLOOR_FACTOR),
    Metric("max_abs_err_vs_reference", "abs"),
    Metric("rel_err_vs_softmax", "ratio"),
    Metric("rel_err_softmax_floor", "ratio"),
    Metric(LEAK, "ratio"),
    *[Metric(f"rel_err_{g}_{kind}", "ratio") for g in (*GRADIENTS, "dweights")
      for kind in ("vs_reference", "floor")],
    *[Metric(f"{m}_head_{q}", "ratio") for m in ("rel_err_vs_softmax", "rel_err_softmax_floor")
      for q in SUMMARIES],
)
SUMMARY = (
    Summary("rel_err_vs_softmax", "rel. error vs exact softmax (output)", "{:.2e}"),
    Summary("floor_ratio", "error / same-dtype floor (output: fwd; largest over dq, dk, dv, "
                           "weights: bwd, fwd_bwd)", "{:.2f}"),
)


def sampled_rows(n: int, limit: int, seed: int, device: torch.device) -> torch.Tensor | None:
    """All rows (None) when `n <= limit`, else `limit` seeded distinct query rows, sorted."""
    if n <= limit:
        return None
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(n, generator=gen)[:limit].sort().values.to(device)


def norm(t: torch.Tensor) -> float:
    """Frobenius norm in float64."""
    return float(torch.linalg.vector_norm(t.double()))


def relative_error(out: torch.Tensor, ref: torch.Tensor, zero_scale: float = 0.0) -> float:
    """Frobenius ||out - ref|| / ||ref|| in float64. Where ref is all zero (the gradient of an
    input the output does not depend on, or whose softmax has one key per row), the error is
    relative to `zero_scale` instead, and absolute when that is 0 too."""
    diff = norm(out.double() - ref.double())
    scale = norm(ref) or zero_scale
    return diff / scale if scale > 0 else diff


@dataclass
class Attend:
    """A callable q, k, v -> output at the compared query rows, and its learnable weights."""

    call: Callable
    weights: list[torch.Tensor]


def _rows_picker(rows: torch.Tensor | None) -> Callable:
    return (lambda t: t) if rows is None else (lambda t: t[:, :, rows])


def measured(trial: Trial, rows: torch.Tensor | None) -> Attend:
    """The variant as measured, its output restricted to `rows`."""
    pick = _rows_picker(rows)
    return Attend(lambda q, k, v: pick(trial.fn(q, k, v)), trial.learnable)


def reference(trial: Trial, dtype: torch.dtype, rows: torch.Tensor | None) -> Attend:
    """The variant's declared reference math in `dtype`, output restricted to `rows`.

    A reference that declares `rows_reference` (exact softmax) computes the rows alone
    (O(rows * N) memory).
    A module reference gets the measured variant's learnable weights (float64 for the
    float64 reference; as the variant holds them for the same-dtype floor).
    """
    spec = get_variant(trial.variant.spec.reference or trial.variant.spec.name)
    causal = trial.shape.causal
    if spec.rows_reference is not None:
        index = rows if rows is not None else torch.arange(trial.shape.seq_len,
                                                            device=trial.device)
        return Attend(lambda q, k, v: spec.rows_reference(q, k, v, index, causal), [])
    params = {k: v for k, v in trial.variant.params.items() if k in spec.params}
    fn = spec.factory(replace(trial.shape, dtype=dtype), **params)
    weights: list[torch.Tensor] = []
    if isinstance(fn, nn.Module):
        fn = fn.to(device=trial.device)
        if dtype == torch.float64:
            fn = fn.to(dtype=torch.float64)
        if isinstance(trial.fn, nn.Module):  # same learnable weights as the measured variant
            fn.load_state_dict(trial.fn.state_dict())
        weights = list(fn.parameters())
    pick = _rows_picker(rows)
    return Attend(lambda q, k, v: pick(fn(q, k, v)), weights)


def exact_softmax(trial: Trial, dtype: torch.dtype, rows: torch.Tensor | None) -> torch.Tensor:
    """Exact softmax attention of the trial's inputs in `dtype` at the compared rows."""
    index = rows if rows is not None else torch.arange(trial.shape.seq_len, device=trial.device)
    q, k, v = (t.to(dtype) for t in trial.inputs)
    return get_variant(EXACT).rows_reference(q, k, v, index, trial.shape.causal)


def gradients(attend: Attend, inputs, d_out: torch.Tensor) -> dict[str, torch.Tensor]:
    """dq, dk, dv (and `dweights`, every learnable weight's gradient flattened into one
    vector) of `sum(attend(q, k, v) * d_out)`."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    for w in attend.weights:
        w.grad = None
    attend.call(*leaves).backward(d_out.to(leaves[0].dtype))
    grads = {name: t.grad if t.grad is not None else torch.zeros_like(t)
             for name, t in zip(GRADIENTS, leaves)}
    if attend.weights:
        grads["dweights"] = torch.cat([(w.grad if w.grad is not None else torch.zeros_like(w))
                                       .flatten() for w in attend.weights])
    return grads


def verdict(errors: dict[str, float], floors: dict[str, float]) -> tuple[float, str]:
    """The largest error-to-floor ratio, and a reason naming each quantity over the limit
    (empty when none is)."""
    ratios = {name: errors[name] / max(floors[name], FLOOR_MIN) for name in errors}
    over = [f"{name} error {errors[name]:.1e} is {ratios[name]:.3g}x its floor "
            f"{floors[name]:.1e}" for name in errors if ratios[name] > FLOOR_FACTOR]
    reason = f"{'; '.join(over)} (limit {FLOOR_FACTOR:g}x)" if over else ""
    return max(ratios.values()), reason


def forward_metrics(trial: Trial, rows) -> tuple[dict[str, float], str]:
    """Output errors against the float64 reference, its same-dtype floor and exact softmax."""
    q, k, v = trial.inputs
    q64, k64, v64 = (t.double() for t in trial.inputs)
    out = _rows_picker(rows)(trial.forward())
    with torch.no_grad():
        ref = reference(trial, torch.float64, rows).call(q64, k64, v64)
        low = reference(trial, trial.shape.dtype, rows).call(q, k, v)
    exact = exact_softmax(trial, torch.float64, rows)
    err, floor = relative_error(out, ref), relative_error(low, ref)
    ratio, reason = verdict({"o": err}, {"o": floor})
    metrics = {
        "rel_err_vs_reference": err,
        "rel_err_floor": floor,
        "floor_ratio": ratio,
        "max_abs_err_vs_reference": float((out.double() - ref).abs().max()),
        "rel_err_vs_softmax": relative_error(out, exact),
    }
    low_exact = None
    if trial.shape.dtype in LOW_PRECISION:
        low_exact = exact_softmax(trial, trial.shape.dtype, rows)
        metrics["rel_err_softmax_floor"] = relative_error(low_exact, exact)
    if trial.inputs_name != "randn":  # captured inputs: per (layer, head), suites.realinputs
        metrics.update(per_head_metrics(trial, out, exact, low_exact))
    return metrics, reason


def upstream_gradient(trial: Trial, rows) -> torch.Tensor:
    """Seeded dO at the compared rows (the rows not compared get none, so that every
    gradient, dk and dv included, is exactly what the sampled rows' outputs contribute),
    rounded to the variant's dtype: the float64 reference takes the same dO as the variant,
    as it takes the same rounded q, k, v."""
    b, h, n, d = trial.inputs[0].shape
    gen = torch.Generator(device="cpu").manual_seed(trial.config.seed + 1)
    count = n if rows is None else len(rows)
    d_out = torch.randn(b, h, count, d, generator=gen).to(trial.device, trial.shape.dtype)
    return d_out.double()


def gradient_metrics(trial: Trial, rows) -> tuple[dict[str, float], str]:
    """Every gradient's error against the float64 reference, beside its same-dtype floor
    (relative to the norm of dq, dk and dv together for a gradient that is exactly zero)."""
    d_out = upstream_gradient(trial, rows)
    got = gradients(measured(trial, rows), trial.inputs, d_out)
    ref = gradients(reference(trial, torch.float64, rows),
                    [t.double() for t in trial.inputs], d_out)
    low = gradients(reference(trial, trial.shape.dtype, rows), trial.inputs, d_out)
    names = [name for name in got if name in ref]
    # A gradient that is exactly zero is judged against the size of all the input gradients.
    whole = sum(norm(ref[name]) ** 2 for name in GRADIENTS) ** 0.5
    errors = {name: relative_error(got[name], ref[name], whole) for name in names}
    floors = {name: relative_error(low[name], ref[name], whole) for name in names}
    ratio, reason = verdict(errors, floors)
    metrics = {}
    for name in names:
        metrics[f"rel_err_{name}_vs_reference"] = errors[name]
        metrics[f"rel_err_{name}_floor"] = floors[name]
    metrics["floor_ratio"] = ratio
    return metrics, reason


def accuracy_modes(requested: tuple[str, ...]) -> tuple[str, ...]:
    """The output always; the gradients once when a backward mode is requested (under
    `fwd_bwd` if asked for, else `bwd`): they are the same in both."""
    return ("fwd", *[m for m in ("fwd_bwd", "bwd") if m in requested][:1])


def accuracy_cost(case: CaseCost) -> float:
    """`fwd`: the output, its floor, the causal check's two forwards and the float64
    reference; gradients: the measured ones, the floor's and the float64 reference's."""
    if case.mode == "fwd":
        return 4 * case.call_s("fwd") + case.fp64_s("fwd")
    return 2 * case.call_s(case.mode) + case.fp64_s(case.mode)


@register_suite("accuracy", modes=MODES, primary="floor_ratio", metrics=METRICS,
                summary=SUMMARY, order=30, select_modes=accuracy_modes, cost=accuracy_cost)
def run_accuracy(trial: Trial, mode: str) -> dict[str, float]:
    """`fwd`: rel_err_vs_reference, its floor, max_abs_err_vs_reference, rel_err_vs_softmax
    (and for bf16/fp16 rel_err_softmax_floor, exact attention's own error at that precision).
    `bwd`/`fwd_bwd`: rel_err_<grad>_vs_reference and rel_err_<grad>_floor for dq, dk, dv and
    dweights. Both: floor_ratio, the largest error over its floor; above FLOOR_FACTOR that
    row is flagged `inexact` with the reason (`Trial.flags`). Causal `fwd` cases also get
    `future_key_leak` (an error row when the output reads future keys, `suites.causality`).

    At lengths above `config.accuracy_rows` the comparison uses that many seeded query rows
    (each exact at O(N D) cost; dO is zero elsewhere); the count is observed as `ref_rows`.
    """
    n = trial.shape.seq_len
    rows = sampled_rows(n, trial.config.accuracy_rows, trial.config.seed, trial.device)
    if mode == "fwd":
        metrics, reason = forward_metrics(trial, rows)
        metrics.update(check_causal(trial))  # a causal output that reads future keys: error row
    else:
        metrics, reason = gradient_metrics(trial, rows)
    if rows is not None:
        trial.observed["ref_rows"] = len(rows)
    if reason:
        trial.flags["floor_ratio"] = reason
    return metrics
