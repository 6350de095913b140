"""The time suite: median, p20, p80 per call, and the roofline figures derived from them."""
from __future__ import annotations

from harness.suite import MODES, CaseCost, Metric, Summary, register_suite
from harness.timing import time_closure
from harness.trial import Trial


def time_cost(case: CaseCost) -> float:
    """A warm-up call, then the larger of the time budget and the minimum sample count."""
    call = case.call_s(case.mode)
    return call + max(case.config.rep_ms / 1e3, case.config.min_samples * call)


@register_suite(
    "time", modes=MODES, primary="time_ms", scaling=True, order=10, cost=time_cost,
    metrics=(
        Metric("time_ms", "ms", label="time", band=("time_ms_p20", "time_ms_p80")),
        Metric("time_ms_p20", "ms"),
        Metric("time_ms_p80", "ms"),
        Metric("tflops", "TFLOP/s", higher_is_better=True, rate_of="time_ms"),
        Metric("gbps", "GB/s", higher_is_better=True, rate_of="time_ms"),
        Metric("roofline_frac", "fraction", higher_is_better=True, rate_of="time_ms"),
    ),
    summary=(Summary("time_ms", "time (ms, median)", "{:.3g}"),),
)
def run_time(trial: Trial, mode: str) -> dict[str, float]:
    """Time `mode` of the trial; report TFLOP/s, GB/s and the fraction of the floor."""
    fn, grads = trial.closure(mode)
    fn()  # warm-up outside timing: compilation and autotuning happen here
    stats = time_closure(
        fn, trial.device, trial.config.warmup_ms, trial.config.rep_ms, grad_to_none=grads,
        cuda_graph=trial.config.cuda_graph, min_samples=trial.config.min_samples,
    )
    metrics = {"time_ms": stats.median, "time_ms_p20": stats.p20, "time_ms_p80": stats.p80}
    return {**metrics, **rates(trial, mode, stats.median)}


def rates(trial: Trial, mode: str, median_ms: float) -> dict[str, float]:
    """TFLOP/s (when the variant counts its FLOPs), GB/s and, on a device whose roofline was
    measured, the fraction of the floor, of `mode` taking `median_ms` per call."""
    seconds = median_ms * 1e-3
    flops, nbytes = trial.flops(mode), trial.min_bytes(mode)
    out = {}
    if flops is not None:
        out["tflops"] = flops / seconds / 1e12
    out["gbps"] = nbytes / seconds / 1e9
    if trial.roofline is not None and flops is not None:
        out["roofline_frac"] = trial.roofline.floor_ms(flops, nbytes) / median_ms
    return out
