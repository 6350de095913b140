"""The memory suite: peak extra memory of one call, inputs excluded."""
from __future__ import annotations

from harness.memory import peak_extra_mib
from harness.suite import MODES, Metric, Summary, register_suite
from harness.trial import Trial


@register_suite(
    "memory", modes=MODES, primary="peak_mem_mib", scaling=True, order=20,
    cost=lambda case: 2 * case.call_s(case.mode),  # a warm-up call and the measured one
    metrics=(Metric("peak_mem_mib", "MiB", label="peak memory"),),
    summary=(Summary("peak_mem_mib", "peak extra memory (MiB)", "{:.4g}"),),
)
def run_memory(trial: Trial, mode: str) -> dict[str, float]:
    """Peak memory beyond the inputs during one call of `mode` (after a warm-up call)."""
    fn, grads = trial.closure(mode)
    fn()  # autotuning and lazily built buffers stay out of the measurement
    for t in grads:
        t.grad = None
    return {"peak_mem_mib": peak_extra_mib(fn, trial.device)}
