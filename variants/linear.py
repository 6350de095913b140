"""Linear attention (Katharopoulos et al. 2020): PyTorch reference.

`o_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps)` with `S_i = sum_j phi(k_j) v_j^T` and
`z_i = sum_j phi(k_j)` over all keys, or keys `j <= i` when causal.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from harness.registry import Shape, register_variant

EPS = 1e-6

# The FMMformer feature maps phi_1..phi_3. phi_3 is tanh(x) + 1, as in the authors'
# code: the method card's plain tanh(x) makes the normalizer sign-indefinite.
FEATURE_MAPS = {
    "elu": lambda x: F.elu(x) + 1,
    "elu_neg": lambda x: F.elu(-x) + 1,
    "tanh": lambda x: torch.tanh(x) + 1,
}
LINEAR_PARAMS = {"feature_map": "elu"}
LINEAR_CHOICES = {"feature_map": tuple(FEATURE_MAPS)}


def linear_flops(shape: Shape, params: dict) -> float:
    """phi(K)^T V and phi(Q) S: two N x D x D products per head (the normalizer is O(N D))."""
    return 4.0 * shape.batch * shape.heads * shape.seq_len * shape.head_dim**2


def linear_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    feature_map: str = "elu",
    eps: float = EPS,
    chunk: int = 64,
) -> torch.Tensor:
    """Linear attention; the causal form is chunked so memory stays O(N D).

    fp16 inputs are computed in fp32 and the output rounded back: the states and normalizers
    sum over up to N keys and leave fp16's range (65504) from a few thousand keys on.

    Args:
        q, k, v: `[B, H, N, D]`.
        causal: prefix sums (keys `j <= i`) instead of global sums.
        feature_map: key of `FEATURE_MAPS`.
        eps: added to the normalizer.
        chunk: causal chunk length C: states are carried across chunks, and inside a chunk
            the masked `(phi(Q) phi(K)^T * mask) V` product is used.
    """
    if q.dtype == torch.float16:
        out = linear_reference(q.float(), k.float(), v.float(), causal, feature_map, eps, chunk)
        return out.to(torch.float16)
    phi = FEATURE_MAPS[feature_map]
    fq, fk = phi(q), phi(k)
    if not causal:
        state = torch.einsum("bhnd,bhne->bhde", fk, v)
        numer = torch.einsum("bhnd,bhde->bhne", fq, state)
        denom = torch.einsum("bhnd,bhd->bhn", fq, fk.sum(dim=-2))
        return numer / (denom.unsqueeze(-1) + eps)

    b, h, n, d = q.shape
    pad = (-n) % chunk
    # Padding sits after every real query, so the causal mask keeps it out of real outputs.
    fq, fk, vp = (F.pad(t, (0, 0, 0, pad)) for t in (fq, fk, v))
    nc = (n + pad) // chunk
    fq, fk, vp = (t.reshape(b, h, nc, chunk, -1) for t in (fq, fk, vp))
    # Exclusive prefix over chunks of the chunk-local states: what each chunk inherits.
    chunk_states = torch.einsum("bhcnd,bhcne->bhcde", fk, vp)
    inherited = torch.cumsum(chunk_states, dim=2) - chunk_states
    inherited_z = torch.cumsum(fk.sum(dim=3), dim=2) - fk.sum(dim=3)
    mask = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    local = torch.einsum("bhcid,bhcjd->bhcij", fq, fk) * mask
    numer = torch.einsum("bhcid,bhcde->bhcie", fq, inherited) + local @ vp
    denom = torch.einsum("bhcid,bhcd->bhci", fq, inherited_z) + local.sum(dim=-1)
    out = numer / (denom.unsqueeze(-1) + eps)
    return out.reshape(b, h, nc * chunk, d)[:, :, :n]


@register_variant(
    "linear",
    family="linear",
    params=LINEAR_PARAMS,
    short={"feature_map": "phi"},
    choices=LINEAR_CHOICES,
    flops=linear_flops,
)
def make_linear(shape: Shape, feature_map: str):
    """Linear attention (elu+1 by default), PyTorch reference; causal is chunked."""
    return functools.partial(linear_reference, causal=shape.causal, feature_map=feature_map)
