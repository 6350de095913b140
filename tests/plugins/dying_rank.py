"""Test plugin for sharded runs: a variant whose process dies at one length, and one that runs
out of memory from N = 32 on.

rank_killer is exact attention; when ATTNBENCH_TEST_KILL is set and the process is a torchrun
rank, building it for N = 32 (non-causal) kills its own process with SIGKILL, as a node failure
or the kernel's OOM killer would. oom_from_32 raises CUDA's out-of-memory error from N = 32 on,
so that a sweep records N = 32 as `oom` and larger lengths as skipped after it.
"""
import os
import signal

import torch

from harness.registry import register_variant
from variants.softmax import softmax_reference as attention


@register_variant("rank_killer", family="softmax")
def make_rank_killer(shape):
    """Exact attention; kills its torchrun process at N = 32 when ATTNBENCH_TEST_KILL is set."""
    if (shape.seq_len == 32 and not shape.causal and os.environ.get("ATTNBENCH_TEST_KILL")
            and "RANK" in os.environ):
        os.kill(os.getpid(), signal.SIGKILL)
    return lambda q, k, v: attention(q, k, v, shape.causal)


@register_variant("oom_from_32", family="softmax")
def make_oom_from_32(shape):
    """Exact attention below N = 32; out of memory from N = 32 on."""
    def call(q, k, v):
        if shape.seq_len >= 32:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64 GiB")
        return attention(q, k, v, shape.causal)
    return call
