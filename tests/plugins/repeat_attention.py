"""Test plugin: exact attention computed several times per call, to make real slowdowns.

`ATTNBENCH_TEST_REPEAT` (default 2) sets how many times each call computes it: 3 instead of 2
is a 1.5x slowdown of the same work, with the same variant name and parameters.
"""
import os

import torch

from harness.registry import register_variant

REPEAT = int(os.environ.get("ATTNBENCH_TEST_REPEAT", "2"))


@register_variant("repeat_softmax", family="softmax",
                  flops=lambda shape, p: 4.0 * shape.numel * shape.seq_len * REPEAT)
def make_repeat_softmax(shape):
    """Softmax attention, computed REPEAT times per call (the last result is returned)."""
    def attend(q, k, v):
        for _ in range(REPEAT):
            scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
            if shape.causal:
                n = q.shape[-2]
                mask = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
                scores = scores.masked_fill(mask, float("-inf"))
            out = torch.softmax(scores, dim=-1) @ v
        return out
    return attend
