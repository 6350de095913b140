"""Fast Multipole Attention in Triton: forward and backward (conventions: `variants.fma`).

All queries of a finest block share every level's interaction list, so a query tile is a dense
attention over its near keys (blocks b-1..b+1) plus a short list of coarse tokens (3 p_l per
level). Three phases: avgpool summaries in one pass over K and V (`pool.py`; learned conv
summaries come from PyTorch instead, autograd handles the conv); the attention kernel
(`forward.py`) over the near key tiles and the tile's coarse tokens from a host-built table
(`plan.py`); the backward (`backward.py`). Launch configs: `configs.py`. Nothing N x N exists:
memory is O(N D) plus O(N D / s_1) for the summaries.
"""
from __future__ import annotations

import torch

from harness.registry import Shape, register_variant, triton_devices
from variants.fma import (
    FMA_CHOICES,
    FMA_PARAMS,
    FMA_SHORT,
    FMAAttention,
    Summaries,
    check_fma,
    fma_flops,
    fma_min_bytes,
)
from variants.fma_triton.backward import fma_bwd
from variants.fma_triton.configs import BLOCKS, LaunchConfig, fma_config
from variants.fma_triton.forward import fma_fwd
from variants.fma_triton.plan import fma_plan
from variants.triton_common import ObservesLaunch, unsupported_shape

__all__ = ["FMATriton", "LaunchConfig", "fma_bwd", "fma_config", "fma_fwd", "fma_plan",
           "fma_triton"]


class _FMATriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ck, cv, params: dict):
        coarse = None if ck is None else (ck, cv)
        o, lse, ck, cv = fma_fwd(q, k, v, coarse=coarse, **params)
        ctx.save_for_backward(q, k, v, o, lse, ck, cv)
        ctx.params, ctx.given = params, coarse is not None
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, ck, cv = ctx.saved_tensors
        dq, dk, dv, dck, dcv = fma_bwd(
            q, k, v, o, lse, do, ck, cv, pool_adjoint=not ctx.given, **ctx.params
        )
        if not ctx.given:
            return dq, dk, dv, None, None, None
        return dq, dk, dv, dck.to(ck.dtype), dcv.to(cv.dtype), None


def fma_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    m: int = 64,
    p: int = 2,
    causal: bool = False,
    scale_attn: bool = True,
    zero_pad: bool = False,
    coarse: Summaries | None = None,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """Fast Multipole Attention with Triton forward and backward (differentiable in q, k, v and
    in the summaries when given).

    Args:
        q, k, v: `[B, H, N, D]`, fp16/bf16/fp32, D in {16, 32, 64, 128}, any N.
        m: finest block, in {16, ..., 256} (default 64).
        p, causal, scale_attn, zero_pad: as in `variants.fma.fma_reference`.
        coarse: per-level `(ck_l, cv_l)` `[B, H, rows_l, D]` (learned conv summaries of the
            zero-padded K, V); None computes avgpool summaries inside (fused adjoint).
        config: launch config (default `fma_config(m, causal, D, q.device)`).

    Returns:
        `o` `[B, H, N, D]` in the input dtype.
    """
    ck = cv = None
    if coarse is not None:
        ck = torch.cat([c for c, _ in coarse], dim=2).to(q.dtype) if coarse else q.new_zeros(0)
        cv = torch.cat([c for _, c in coarse], dim=2).to(q.dtype) if coarse else q.new_zeros(0)
    params = dict(m=m, p=p, causal=causal, scale_attn=scale_attn, zero_pad=zero_pad, config=config)
    return _FMATriton.apply(q, k, v, ck, cv, params)


def check_fma_triton(shape: Shape, params: dict) -> str | None:
    reason = unsupported_shape("fma_triton", shape)
    if reason is None and params["m"] not in BLOCKS:
        reason = f"fma_triton needs m in {BLOCKS}, got {params['m']}"
    return reason or check_fma(shape, params)


class FMATriton(ObservesLaunch, FMAAttention):
    """`FMAAttention` through the Triton kernels, reporting the launch config it used."""

    def __init__(self, seq_len: int, head_dim: int, **kwargs):
        super().__init__(seq_len, head_dim, impl=fma_triton, **kwargs)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[2] != self.geo.n:
            raise ValueError(f"this FMAAttention was built for N={self.geo.n}, got N={q.shape[2]}")
        config = fma_config(self.kwargs["m"], self.kwargs["causal"], q.shape[-1], q.device)
        self.last_launch = str(config)
        coarse = self.summaries(k, v) if self.downsample == "conv" else None
        return fma_triton(q, k, v, coarse=coarse, config=config, **self.kwargs)


@register_variant(
    "fma_triton",
    family="multipole",
    params=FMA_PARAMS,
    short=FMA_SHORT,
    choices=FMA_CHOICES,
    devices=triton_devices(),
    requires=("triton",),
    check=check_fma_triton,
    reference="fma",
    flops=fma_flops,
    min_bytes=fma_min_bytes,
)
def make_fma_triton(
    shape: Shape, m: int, p: int, downsample: str, scale_attn: bool, zero_pad: bool
):
    """Fast Multipole Attention, Triton: fused near + coarse flash kernel, Triton backward."""
    return FMATriton(
        shape.seq_len, shape.head_dim, m=m, p=p, causal=shape.causal, scale_attn=scale_attn,
        zero_pad=zero_pad, downsample=downsample,
    )  # fmt: skip
