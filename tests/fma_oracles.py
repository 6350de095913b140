"""FMA oracles for the tests: the interaction lists rebuilt query by query from the FMA
definition (`query_slots`), their coverage of the keys, and the dense attention matrix they give
(O(N^2) memory: small N only)."""
from __future__ import annotations

import math

import torch

from variants.fma import FMAGeometry, fma_geometry

def query_slots(i: int, geo: FMAGeometry, causal: bool) -> list[tuple[int, int, int]]:
    """`(level, start, stop)` of every slot in query i's interaction lists, in padded positions.

    Level-0 slots are single keys; a coarse slot covers the `s_l` tokens under it. Slots of groups
    outside the sequence keep their (out-of-range) positions.
    """
    m = geo.m
    b = i // m
    out = []
    for blk in (b - 1, b) if causal else (b - 1, b, b + 1):
        out += [(0, j, j + 1) for j in range(blk * m, blk * m + m) if not (causal and j > i)]
    for level in range(1, geo.levels + 1):
        w, p_l, s = geo.widths[level - 1], geo.slots[level - 1], geo.windows[level - 1]
        if causal:
            c, t = i // (2 * w), (i % (2 * w)) // w
            groups = [2 * c - 2] + ([2 * c - 1] if t == 1 else [])
        else:
            beta = i // w
            offsets = (-2, 2, 3) if beta % 2 == 0 else (-3, -2, 2)
            groups = [beta + o for o in offsets]
        out += [(level, g * w + r * s, g * w + r * s + s) for g in groups for r in range(p_l)]
    return out


def fma_coverage(n: int, m: int, p: int, causal: bool) -> torch.Tensor:
    """`[n_pad, n_pad]` int: how many slots of query i's lists cover token j (padded problem).

    The FMM lists partition the keys: this is 1 for every `j` (non-causal) or `j <= i` (causal)
    and 0 elsewhere.
    """
    geo = fma_geometry(n, m, p)
    cover = torch.zeros(geo.n_pad, geo.n_pad, dtype=torch.int64)
    for i in range(geo.n_pad):
        for _, start, stop in query_slots(i, geo, causal):
            cover[i, max(start, 0) : max(min(stop, geo.n_pad), 0)] += 1
    return cover


def fma_dense_matrix(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    m: int,
    p: int,
    causal: bool,
    scale_attn: bool = True,
    zero_pad: bool = False,
) -> torch.Tensor:
    """The FMA (avgpool) attention matrix `A` `[B, H, N, N]` in float64, with `o = A v`.

    Built query by query from `query_slots`: each slot's key is the mean of the real keys under
    it, one softmax over all slots (zero-key slots only add to the denominator), and each slot's
    probability is spread evenly over its real tokens. Differentiable in q and k. Small N only.
    """
    _, _, n, d = q.shape
    geo = fma_geometry(n, m, p)
    q, k = q.double(), k.double()
    # Window means from prefix sums: mean(k[lo:hi]) = (C[hi] - C[lo]) / (hi - lo).
    csum = torch.nn.functional.pad(k.cumsum(dim=2), (0, 0, 1, 0))
    rows = []
    for i in range(n):
        lo, hi, logrho, zero = [], [], [], []
        for level, start, stop in query_slots(i, geo, causal):
            outside = stop <= 0 or start >= geo.n_pad
            if not outside and min(stop, n) <= start:  # only padding under it
                continue
            if outside and not zero_pad:
                continue
            size = (stop - start) if outside else (min(stop, n) - start)
            lo.append(0 if outside else start)
            hi.append(0 if outside else start + size)
            logrho.append(math.log(size if (scale_attn and level > 0) else 1))
            zero.append(outside)
        lo, hi = torch.tensor(lo), torch.tensor(hi)
        count = (hi - lo).clamp(min=1).to(k)
        keys = (csum[:, :, hi] - csum[:, :, lo]) / count[:, None]  # zero for zero slots
        logrho = torch.tensor(logrho, dtype=k.dtype, device=k.device)
        logits = (keys @ q[:, :, i, :, None]).squeeze(-1) * d**-0.5 + logrho
        probs = torch.softmax(logits, dim=-1)  # [B, H, slots]
        # Spread each slot's probability evenly over its real tokens (zero slots have none).
        j = torch.arange(n)
        spread = ((j >= lo[:, None]) & (j < hi[:, None])).to(k) / count[:, None]
        rows.append(probs @ spread)
    return torch.stack(rows, dim=2)
