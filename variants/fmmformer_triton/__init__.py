"""FMMformer (band + far field + blend) as Triton kernels, forward and backward.

`o = w_near * Near + w_far * sum_{l<=r} Far_l`, Near the banded softmax of bandwidth k, Far_l
linear attention with phi_l (elu+1, elu(-x)+1, tanh+1) over all keys, or the prefix when causal.

Forward (`forward.py`): a state pass (`states.py`) reduces `S_l = phi_l(K)^T V` and
`z_l = sum phi_l(K)` per chunk of rows, one program per chunk and head computing every map from
one read of each tile. Non-causal: the chunk states are summed into one global state (the
partials live in `o`, not yet written) and one kernel walks query tiles, computing the band
with window_triton's online softmax over the key tiles that meet it, the r far-field terms and
the blend, writing `o` once. Causal: a band pass writes w_near * Near into o; then per map its
chunk prefix states (a state pass and a scan) and a walk with that one state in registers add
w_far Far_l to o (o is rounded to its dtype once per pass).

Backward (`backward.py`), non-causal: `dq` takes query tiles (far field, then band), storing
each row's far normalizers `den_l` and `dL/d den_l`; a weighted state pass reduces the dual
states `U_l = sum_i phi_l(q_i) (w_far dO_i / den_l,i)^T`; `dk, dv` takes key tiles (band, then
the far field from `U_l`). Causal, in passes as the forward: per map a query-side walk over the
forward's chunks from their kept prefix states (dq, den_l, dL/d den_l, dO . Far_l, and each
chunk's sum of U_l), an in-place suffix scan of those sums, and a key-side walk last to first
(dk, dv); then the band's dq (and its softmax delta) and dk, dv. The gradients are accumulated
in their own dtype across the passes. dL/dw_near and dL/dw_far come from per-program partial
sums.

The band's dq walks the band's keys twice per query tile: first an online softmax over the
band's own scores, in fp32 (each row's score max m, l = sum_j exp2((s_ij - m) qk_scale) and
`dO . Near`), then adding dS K. Nothing of the forward's softmax is reused: its scores can
differ from the backward's in their last bits (another tile shape, a multiply fused into a
subtraction), and at large scores a last bit moves P by more than the gradient's precision.
From one set of scores, a row whose band holds one key has P exactly 1 and dS exactly 0, as in
the dense math. The key side reads m, 1 / l and `dO . Near` per row. (The delta taken as
`dO . o - w_far sum_l dO . Far_l` would lose the band's digits to cancellation when the far
field dominates o.) dL/dw_near is summed from the same P and dO V^T, so nothing is divided by
w_near.

Memory: forward-only calls allocate `o` plus, causal, one map's chunk states at a time (under
a fraction of `o`'s bytes or a floor, `FMMConfig`). With grad, the forward also keeps, causal,
every map's chunk states; the backward takes `O(N)` row statistics
and, causal, one map's chunk dual sums. Launch configs: `configs.py`.
"""
from __future__ import annotations

import torch

from harness.registry import Shape, register_variant, triton_devices
from variants.fmmformer import (
    FMM_CHOICES,
    FMM_PARAMS,
    FMM_SHORT,
    FMMformerAttention,
    blend_weights,
    fmm_flops,
)
from variants.fmmformer_triton.backward import fmmformer_bwd
from variants.fmmformer_triton.configs import FMMConfig, KernelConfig, fmm_config
from variants.fmmformer_triton.forward import fmmformer_fwd
from variants.fmmformer_triton.states import Saved
from variants.linear import EPS
from variants.triton_common import ObservesLaunch, unsupported_shape
from variants.window import check_bandwidth

__all__ = ["FMMConfig", "FMMformerTriton", "KernelConfig", "fmm_config", "fmmformer_bwd",
           "fmmformer_fwd", "fmmformer_triton"]


class _FMMformerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, w_near, w_far, bandwidth, kernels, causal, eps, config):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, saved = fmmformer_fwd(q, k, v, w_near, w_far, bandwidth, kernels, causal, eps,
                                 save=True, config=config)
        ctx.save_for_backward(q, k, v, w_near, w_far, saved.states, saved.states_z)
        ctx.args = (bandwidth, kernels, causal, eps, saved.chunk_rows, config)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, w_near, w_far, states, states_z = ctx.saved_tensors
        bandwidth, kernels, causal, eps, chunk_rows, config = ctx.args
        saved = Saved(states, states_z, chunk_rows)
        dq, dk, dv, dwn, dwf = fmmformer_bwd(
            q, k, v, saved, do, w_near, w_far, bandwidth, kernels, causal, eps, config
        )
        return dq, dk, dv, dwn.to(w_near.dtype), dwf.to(w_far.dtype), None, None, None, None, None


def fmmformer_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w_near: torch.Tensor,
    w_far: torch.Tensor,
    *,
    bandwidth: int,
    kernels: int,
    causal: bool,
    eps: float = EPS,
    config: FMMConfig | None = None,
) -> torch.Tensor:
    """FMMformer attention through the Triton kernels (same signature as
    `fmmformer_reference`, usable as `FMMformerAttention(impl=...)`).

    Args:
        q, k, v: `[B, H, N, D]`, fp16/bf16/fp32, D in 16/32/64/128, any N.
        w_near, w_far: `[H]` near and far weights (already activated).
        bandwidth: near-field band k >= 0.
        kernels: far-field rank r in 1..3 (phi_1..phi_r: elu+1, elu(-x)+1, tanh+1).
        causal: causal band and prefix far field.
        eps: far-field normalizer epsilon.
        config: launch config (default `fmm_config(D, q.device)`).
    Returns:
        `o`, `[B, H, N, D]` like q; differentiable in q, k, v, w_near and w_far.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, w_near, w_far)):
        return _FMMformerFunction.apply(q, k, v, w_near, w_far, bandwidth, kernels, causal, eps,
                                        config)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return fmmformer_fwd(q, k, v, w_near, w_far, bandwidth, kernels, causal, eps,
                         config=config)[0]


class FMMformerTriton(ObservesLaunch, FMMformerAttention):
    """`FMMformerAttention` through the Triton kernels, reporting the launch config it used."""

    def __init__(self, heads: int, bandwidth: int, kernels: int, causal: bool,
                 blend: str = "sigmoid"):
        super().__init__(heads, bandwidth, kernels, causal, blend, impl=fmmformer_triton)

    def forward(self, q, k, v):
        config = fmm_config(q.shape[-1], q.device)
        self.last_launch = config.describe(self.causal)
        w_near, w_far = blend_weights(self.near_logit, self.far_logit, self.blend)
        return fmmformer_triton(q, k, v, w_near, w_far, bandwidth=self.bandwidth,
                                kernels=self.kernels, causal=self.causal, config=config)


def check_fmm_triton(shape: Shape, params: dict) -> str | None:
    return unsupported_shape("fmmformer_triton", shape) or check_bandwidth(shape, params)


@register_variant(
    "fmmformer_triton",
    family="fmm",
    params=FMM_PARAMS,
    short=FMM_SHORT,
    choices=FMM_CHOICES,
    devices=triton_devices(),
    check=check_fmm_triton,
    reference="fmmformer",
    flops=fmm_flops,
)
def make_fmmformer_triton(shape: Shape, bandwidth: int, kernels: int, blend: str):
    """FMMformer, fused Triton kernels (band + r far terms + blend in one pass), fwd and bwd."""
    return FMMformerTriton(shape.heads, bandwidth, kernels, shape.causal, blend)
