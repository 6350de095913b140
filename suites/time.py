"""The time suite: median, p20, p80 per call, and the roofline figures derived from them."""
from __future__ import annotations

from harness.timing import time_closure
from harness.trial import Trial


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
