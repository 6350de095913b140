"""Test plugin: variants that fail in every way a case can, plus one healthy variant.

fault_raise raises, fault_nan returns NaN, fault_oom asks the allocator for an absurd amount
(it fails at once, as an exhausted allocator would, without touching the machine's memory),
fault_hang is correct attention whose backward never returns, fault_abort kills its own
process with os.abort(), and fault_healthy is correct attention. The hang and the abort need
the isolating worker: in process they would stall or end the test run.
"""
import os
import time

import torch

from harness.registry import register_variant


def attention(q, k, v, causal: bool):
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        n = q.shape[-2]
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@register_variant("fault_healthy", family="softmax")
def make_healthy(shape):
    """Exact attention, causal when asked."""
    return lambda q, k, v: attention(q, k, v, shape.causal)


@register_variant("fault_raise", family="softmax")
def make_raise(shape):
    """Raises on every call."""
    def call(q, k, v):
        raise RuntimeError("injected fault")
    return call


@register_variant("fault_nan", family="softmax")
def make_nan(shape):
    """Returns NaN."""
    return lambda q, k, v: torch.full_like(v, float("nan"))


@register_variant("fault_oom", family="softmax")
def make_oom(shape):
    """Allocates 2^60 bytes on the inputs' device: the allocator refuses at once."""
    def call(q, k, v):
        torch.empty(2**60, dtype=torch.uint8, device=q.device)
        return v
    return call


class _HangInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        while True:
            time.sleep(1)


@register_variant("fault_hang", family="softmax")
def make_hang(shape):
    """Exact attention whose backward never returns (forward cases are fine)."""
    return lambda q, k, v: _HangInBackward.apply(attention(q, k, v, shape.causal))


@register_variant("fault_abort", family="softmax")
def make_abort(shape):
    """Kills its own process."""
    def call(q, k, v):
        os.abort()
    return call
