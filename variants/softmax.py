"""Exact softmax attention: the naive baseline, PyTorch SDPA and FlexAttention."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from harness.registry import Shape, register_variant


def softmax_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      causal: bool) -> torch.Tensor:
    """Naive exact attention: materializes the `[B, H, N, N]` score matrix (the paper's baseline).

    Args:
        q, k, v: `[B, H, N, D]`.
        causal: mask keys `j > i`.
    """
    scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        n = q.shape[-2]
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), v)


def softmax_rows_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, causal: bool
) -> torch.Tensor:
    """Exact attention for the query rows `rows` only, at O(len(rows) * N) memory per head.

    Used for float64 references at lengths where the full N x N matrix does not fit.
    Returns `[B, H, len(rows), D]`.
    """
    scale = q.shape[-1] ** -0.5
    out = []
    for h in range(q.shape[1]):  # one head at a time bounds memory at len(rows) * N
        scores = torch.matmul(q[:, h, rows], k[:, h].transpose(-1, -2)) * scale
        if causal:
            keys = torch.arange(k.shape[-2], device=q.device)
            scores = scores.masked_fill(keys[None, :] > rows[:, None], float("-inf"))
        out.append(torch.matmul(torch.softmax(scores, dim=-1), v[:, h]))
    return torch.stack(out, dim=1)


def softmax_flops(shape: Shape, params: dict) -> float:
    """Two N x N x D matmuls per head; causal does half of them."""
    flops = 4.0 * shape.batch * shape.heads * shape.seq_len**2 * shape.head_dim
    return flops / 2 if shape.causal else flops


@register_variant("softmax_naive", family="softmax", flops=softmax_flops,
                  rows_reference=softmax_rows_reference)
def make_softmax_naive(shape: Shape):
    """Exact attention with the full N x N matrix in memory (FMMformer paper's baseline)."""
    return functools.partial(softmax_reference, causal=shape.causal)


SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}


class SDPAttention:
    """`F.scaled_dot_product_attention`, optionally pinned to one backend.

    `backend_ran` names the backend that actually executed (found once by profiling the
    kernels of the first call), so results say what was measured, not what was asked for.
    """

    def __init__(self, causal: bool, backend: str):
        self.causal = causal
        self.backend = backend
        self.backend_ran: str | None = None

    def __call__(self, q, k, v):
        if self.backend == "auto":
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[self.backend])):
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)

    def detect_backend(self, q, k, v) -> str:
        """Run once under the profiler and name the backend from its kernel names."""
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if q.is_cuda else [])
        with profile(activities=activities) as prof:
            self(q, k, v)
        names = " ".join(e.key.lower() for e in prof.key_averages())
        for backend, marker in (("cudnn", "cudnn"), ("flash", "flash"), ("efficient", "efficient")):
            if marker in names:
                self.backend_ran = backend
                break
        else:
            self.backend_ran = "math"
        return self.backend_ran


# Backends PyTorch has only for CUDA tensors.
CUDA_ONLY_BACKENDS = ("cudnn", "efficient")


def sdpa_available(device: torch.device, params: dict) -> str | None:
    backend = params["backend"]
    if backend in CUDA_ONLY_BACKENDS and device.type != "cuda":
        return f"softmax_sdpa backend '{backend}' runs on cuda, not {device.type}"
    return None


@register_variant(
    "softmax_sdpa",
    family="softmax",
    params={"backend": "auto"},
    choices={"backend": ("auto", *SDPA_BACKENDS)},
    available=sdpa_available,
    flops=softmax_flops,
)
def make_softmax_sdpa(shape: Shape, backend: str):
    """PyTorch scaled_dot_product_attention (FlashAttention / cuDNN / efficient / math)."""
    return SDPAttention(shape.causal, backend)


@functools.cache
def compiled_flex_attention():
    """FlexAttention compiled once per process (uncompiled it materializes the scores)."""
    from torch.nn.attention.flex_attention import flex_attention

    # Every (length, mask, grad) combination is its own graph; past dynamo's default limit
    # of 8 it silently falls back to the unfused, N x N-materializing path.
    dynamo = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo, name):
            setattr(dynamo, name, max(getattr(dynamo, name), 256))
    return torch.compile(flex_attention, dynamic=False)


def flex_available(device: torch.device) -> str | None:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError as exc:
        return f"FlexAttention unavailable: {exc}"
    return None


def make_flex(shape: Shape, mask_mod, device: str = "cuda"):
    """A FlexAttention callable for `mask_mod` (None: dense), block mask built outside timing."""
    from torch.nn.attention.flex_attention import create_block_mask

    block_mask = None
    if mask_mod is not None:
        n = shape.seq_len
        block_mask = create_block_mask(mask_mod, None, None, n, n, device=device)
    flex = compiled_flex_attention()
    return lambda q, k, v: flex(q, k, v, block_mask=block_mask)


def causal_mask(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


@register_variant(
    "softmax_flex",
    family="softmax",
    devices=("cuda",),
    available=flex_available,
    flops=softmax_flops,
)
def make_softmax_flex(shape: Shape):
    """FlexAttention (torch.compile'd Triton), dense or causal block mask."""
    return make_flex(shape, causal_mask if shape.causal else None)
