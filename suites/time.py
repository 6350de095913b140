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
    seconds = stats.median * 1e-3
    flops, nbytes = trial.flops(mode), trial.min_bytes(mode)
    if flops is not None:
        metrics["tflops"] = flops / seconds / 1e12
    metrics["gbps"] = nbytes / seconds / 1e9
    if trial.roofline is not None and flops is not None:
        metrics["roofline_frac"] = trial.roofline.floor_ms(flops, nbytes) / stats.median
    return metrics
