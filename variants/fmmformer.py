"""FMMformer (Nguyen et al., NeurIPS 2021): banded near field plus low-rank far field.

`o = w1 * Near + w2 * sum_{l=1..r} Far_l`, Near the sliding-window attention of bandwidth k,
Far_l linear attention with feature map phi_l over all keys (the far field covers the band
too, as the method's `L V` term does). Blend weights are learnable, one per head.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from harness.registry import Shape, register_variant
from variants.linear import EPS, FEATURE_MAPS, linear_flops, linear_reference
from variants.window import check_bandwidth, window_flops, window_reference

FEATURE_ORDER = tuple(FEATURE_MAPS)  # phi_1 = elu+1, phi_2 = elu(-x)+1, phi_3 = tanh+1
FMM_PARAMS = {"bandwidth": 30, "kernels": 3, "blend": "sigmoid"}
FMM_SHORT = {"bandwidth": "k", "kernels": "r"}
FMM_CHOICES = {"kernels": (1, 2, 3), "blend": ("sigmoid", "residual")}


def fmmformer_reference(
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
) -> torch.Tensor:
    """FMMformer attention from already-activated blend weights.

    Args:
        q, k, v: `[B, H, N, D]`.
        w_near, w_far: `[H]` weights of the near and far fields.
        bandwidth: near-field band k >= 0.
        kernels: far-field rank r in 1..3 (feature maps phi_1..phi_r).
        causal: causal band and prefix-sum far field.
    """
    near = window_reference(q, k, v, bandwidth, causal)
    far = sum(
        linear_reference(q, k, v, causal, feature_map=name, eps=eps)
        for name in FEATURE_ORDER[:kernels]
    )
    shape = (1, -1, 1, 1)
    return w_near.view(shape).to(q.dtype) * near + w_far.view(shape).to(q.dtype) * far


def blend_weights(near_logit: torch.Tensor, far_logit: torch.Tensor, blend: str):
    """Map the learnable logits to (w_near, w_far).

    `sigmoid` (default): sigmoid(a), sigmoid(b), both 0.5 at init.
    `residual`: 1 and the raw far weight (init 0), the authors' `Near + w * Far` form.
    """
    if blend == "sigmoid":
        return torch.sigmoid(near_logit), torch.sigmoid(far_logit)
    return torch.ones_like(near_logit), far_logit


class FMMformerAttention(nn.Module):
    """FMMformer attention with learnable per-head blend logits (both initialised to 0).

    `impl` computes the attention from (q, k, v, w_near, w_far) and keyword parameters;
    the PyTorch reference by default, the fused Triton kernel in `fmmformer_triton`.
    """

    def __init__(
        self,
        heads: int,
        bandwidth: int,
        kernels: int,
        causal: bool,
        blend: str = "sigmoid",
        impl: Callable = fmmformer_reference,
    ):
        super().__init__()
        self.near_logit = nn.Parameter(torch.zeros(heads))
        self.far_logit = nn.Parameter(torch.zeros(heads))
        self.bandwidth, self.kernels, self.causal, self.blend = bandwidth, kernels, causal, blend
        self.impl = impl

    def forward(self, q, k, v):
        w_near, w_far = blend_weights(self.near_logit, self.far_logit, self.blend)
        return self.impl(q, k, v, w_near, w_far, bandwidth=self.bandwidth, kernels=self.kernels,
                         causal=self.causal)


def fmm_flops(shape: Shape, params: dict) -> float:
    """Near field plus r linear attentions."""
    return window_flops(shape, params) + params["kernels"] * linear_flops(shape, params)


@register_variant(
    "fmmformer",
    family="fmm",
    params=FMM_PARAMS,
    short=FMM_SHORT,
    choices=FMM_CHOICES,
    check=check_bandwidth,
    flops=fmm_flops,
)
def make_fmmformer(shape: Shape, bandwidth: int, kernels: int, blend: str):
    """FMMformer, PyTorch reference: blocked band plus r linear attentions, sigmoid blend."""
    return FMMformerAttention(shape.heads, bandwidth, kernels, shape.causal, blend)
