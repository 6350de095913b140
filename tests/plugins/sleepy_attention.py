"""Test plugin: exact attention plus a fixed pause per call, `ATTNBENCH_TEST_SLOWDOWN` times
longer when set (default 1), with the same variant name and parameters.

A pause, unlike extra arithmetic, lasts as long on a busy machine as on an idle one, so a
benchmark gate's verdict on it does not depend on what else the CPU is doing.
"""
import os
import time

from harness.registry import register_variant
from variants.softmax import softmax_flops, softmax_reference

PAUSE_S = 0.02 * float(os.environ.get("ATTNBENCH_TEST_SLOWDOWN", "1"))


@register_variant("sleepy_softmax", family="softmax", flops=softmax_flops)
def make_sleepy_softmax(shape):
    """Exact softmax attention after a PAUSE_S pause."""
    def attend(q, k, v):
        time.sleep(PAUSE_S)
        return softmax_reference(q, k, v, shape.causal)
    return attend
