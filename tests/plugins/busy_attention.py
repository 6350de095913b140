"""Test plugin: exact attention plus a fixed amount of busy work per call, `ATTNBENCH_TEST_SLOWDOWN`
times more when set (default 1), with the same variant name and parameters.

The work is a spin until the process has used `BUSY_S` more CPU seconds: timed by CPU time
(pytest-benchmark's `--benchmark-timer=time.process_time`), a call costs the same on a busy
machine as on an idle one, so a benchmark gate's verdict on it does not depend on what else
the CPU is doing.
"""
import os
import time

from harness.registry import register_variant
from variants.softmax import softmax_flops, softmax_reference

BUSY_S = 0.01 * float(os.environ.get("ATTNBENCH_TEST_SLOWDOWN", "1"))


@register_variant("busy_softmax", family="softmax", flops=softmax_flops)
def make_busy_softmax(shape):
    """Exact softmax attention after BUSY_S seconds of CPU-bound spinning."""
    def attend(q, k, v):
        end = time.process_time() + BUSY_S
        while time.process_time() < end:
            pass
        return softmax_reference(q, k, v, shape.causal)
    return attend
