"""Sliding-window (banded) softmax attention: PyTorch reference and FlexAttention."""
from __future__ import annotations

import functools

import torch

from harness.registry import Shape, register_variant
from variants.softmax import flex_available, make_flex

WINDOW_PARAMS = {"bandwidth": 30}
WINDOW_SHORT = {"bandwidth": "k"}


def window_keys(shape: Shape, bandwidth: int) -> float:
    """Keys per query inside the band (2k+1, or k+1 causal), clipped to N."""
    return min(shape.seq_len, (bandwidth + 1) if shape.causal else (2 * bandwidth + 1))


def window_flops(shape: Shape, params: dict) -> float:
    """Two (keys-in-band x D) products per query."""
    keys = window_keys(shape, params["bandwidth"])
    return 4.0 * shape.batch * shape.heads * shape.seq_len * keys * shape.head_dim


def check_bandwidth(shape: Shape, params: dict) -> str | None:
    if params["bandwidth"] < 0:
        return f"bandwidth must be >= 0, got {params['bandwidth']}"
    return None


def window_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bandwidth: int,
    causal: bool,
    block: int = 256,
) -> torch.Tensor:
    """Banded softmax attention, softmax over `|i - j| <= k` (causal: `i - k <= j <= i`).

    Processes query blocks of `block` rows against the `block + 2k` keys that can reach them,
    so memory is O(N (block + 2k)), never N x N.

    Args:
        q, k, v: `[B, H, N, D]`.
        bandwidth: k >= 0.
        causal: drop keys after the query.
    """
    n = q.shape[-2]
    scale = q.shape[-1] ** -0.5
    right = 0 if causal else bandwidth
    out = []
    for start in range(0, n, block):
        stop = min(n, start + block)
        lo, hi = max(0, start - bandwidth), min(n, stop + right)
        scores = torch.matmul(q[..., start:stop, :], k[..., lo:hi, :].transpose(-1, -2)) * scale
        i = torch.arange(start, stop, device=q.device)[:, None]
        j = torch.arange(lo, hi, device=q.device)[None, :]
        outside = (j < i - bandwidth) | (j > i + right)
        scores = scores.masked_fill(outside, float("-inf"))
        probs = scores.softmax(dim=-1)
        out.append(torch.matmul(probs, v[..., lo:hi, :]))
    return torch.cat(out, dim=-2)


@register_variant(
    "window",
    family="window",
    params=WINDOW_PARAMS,
    short=WINDOW_SHORT,
    check=check_bandwidth,
    flops=window_flops,
)
def make_window(shape: Shape, bandwidth: int):
    """Banded softmax attention, blocked PyTorch reference (O(N k) memory)."""
    return functools.partial(window_reference, bandwidth=bandwidth, causal=shape.causal)


@register_variant(
    "window_flex",
    family="window",
    params=WINDOW_PARAMS,
    short=WINDOW_SHORT,
    devices=("cuda",),
    available=flex_available,
    check=check_bandwidth,
    reference="window",
    flops=window_flops,
)
def make_window_flex(shape: Shape, bandwidth: int):
    """Banded softmax attention through FlexAttention with a band block mask."""
    causal = shape.causal

    def band(b, h, q_idx, kv_idx):
        near = (q_idx - kv_idx <= bandwidth) & (kv_idx - q_idx <= (0 if causal else bandwidth))
        return near

    return make_flex(shape, band)
