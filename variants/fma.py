"""Fast Multipole Attention (Kang, Tran, De Sterck, arXiv 2310.11960; SPEC 1.5): PyTorch reference.

Level 0 is exact attention over the finest blocks `b-1, b, b+1` (size m) around the query's block
`b`; level `l = 1..L` cuts K and V into groups of `w_l = m 2^(l-1)` tokens, reduces each group to
`p_l` coarse tokens (avgpool or a learned conv) and attends to the coarse tokens of the groups in
the query's FMM interaction list. One softmax spans every slot of every level, a coarse slot
weighted by `rho` (the number of keys it stands for) when `scale_attn`.

Choices this module makes where SPEC 1.5 leaves room (the Triton kernel follows the same ones):
- Padding: N is padded to `n_pad = m 2^J`, the smallest such length >= N; `L = max(J - 1, 0)`.
  Padding keys never receive weight: near keys `j >= N` are masked; an avgpool coarse token is the
  mean of the *real* tokens under its window, a conv token the conv of the zero-padded K, V; a
  window holding no real token is excluded. Outputs of real queries are exact for this padded
  problem. The padding lies after every real token, so causal results never see it.
- Small N: `n_pad <= 2m` has no coarse level (L = 0) and the near field covers every key, so FMA
  is exact softmax attention there.
- `rho`: with `scale_attn` a coarse slot weighs the number of real tokens under it (`w_l / p_l`
  for full windows, SPEC's `rho_l`), else 1. Level 0 slots weigh 1.
- `p_l = min(p, w_l)`: a group cannot hold more tokens than it has. With `p >= n_pad / 4` every
  coarse token is a single key with rho = 1 and FMA equals exact softmax attention (the
  compression-off check in the tests).
- `zero_pad` (the authors' code): slots of the interaction list that fall outside the padded
  sequence `[0, n_pad)` are zero keys (logit exactly 0) with zero values, weighted like their level
  (`rho_l` = `w_l / p_l`, or 1; 1 at level 0), and counted in the denominator. Off by default:
  such slots are excluded (-inf). Padding tokens inside `[N, n_pad)` stay excluded either way.
- `conv`: one `Conv1d(D, D, kernel_size=w_l/p_l, stride=w_l/p_l)` per level for K and one for V
  (the issue's form; the authors' code uses `Conv1d(D, p D, w_l, stride=w_l)`), shared by all
  heads, applied as the equivalent matmul. Weights start as the averaging kernel plus small noise
  from a generator with a fixed seed, so separately built modules (a fast variant and its float64
  reference) are identical.
"""
from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from harness.registry import Shape, qkvo_bytes, register_variant

FMA_PARAMS = {"m": 64, "p": 2, "downsample": "avgpool", "scale_attn": True, "zero_pad": False}
FMA_SHORT = {"downsample": "ds", "scale_attn": "scale", "zero_pad": "zpad"}
FMA_CHOICES = {
    "downsample": ("avgpool", "conv"),
    "scale_attn": (True, False),
    "zero_pad": (True, False),
}
CONV_SEED = 2310  # fixed: every FMAAttention built with the same params gets the same weights

Summaries = list[tuple[torch.Tensor, torch.Tensor]]


def _is_pow2(x: int) -> bool:
    return x >= 1 and x & (x - 1) == 0


@dataclass(frozen=True)
class FMAGeometry:
    """Level structure of one sequence length. Per-level tuples are indexed `l - 1`."""

    n: int  # real tokens
    m: int  # finest block
    p: int  # coarse tokens per group (before the min with w_l)
    n_pad: int  # m * 2**J >= n
    blocks: int  # n_pad // m
    levels: int  # L
    widths: tuple[int, ...]  # w_l = m 2^(l-1)
    slots: tuple[int, ...]  # p_l = min(p, w_l)
    windows: tuple[int, ...]  # s_l = w_l / p_l, tokens under one coarse token
    rows: tuple[int, ...]  # coarse tokens of the level, n_pad / s_l
    offsets: tuple[int, ...]  # first row of the level in a levels-concatenated buffer
    total_rows: int

    def valid_counts(self, level: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Real tokens under each coarse token of `level` (1-based): `[rows]` int64."""
        s = self.windows[level - 1]
        start = torch.arange(self.rows[level - 1], device=device) * s
        return (self.n - start).clamp(0, s)


@functools.lru_cache(maxsize=256)
def fma_geometry(n: int, m: int, p: int) -> FMAGeometry:
    """The padded length and level structure for `n` tokens (m, p powers of two)."""
    if n < 1:
        raise ValueError(f"sequence length must be >= 1, got {n}")
    if not _is_pow2(m):
        raise ValueError(f"m must be a power of two, got {m}")
    if not _is_pow2(p):
        raise ValueError(f"p must be a power of two, got {p}")
    blocks = 1
    while blocks * m < n:
        blocks *= 2
    levels = max(blocks.bit_length() - 2, 0)  # log2(blocks) - 1
    n_pad = blocks * m
    widths = tuple(m << i for i in range(levels))
    slots = tuple(min(p, w) for w in widths)
    windows = tuple(w // s for w, s in zip(widths, slots))
    rows = tuple(n_pad // s for s in windows)
    offsets = tuple(itertools.accumulate((0, *rows[:-1])))[:levels]
    return FMAGeometry(
        n, m, p, n_pad, blocks, levels, widths, slots, windows, rows, offsets, sum(rows)
    )


def block_groups(
    blocks: torch.Tensor, level: int, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Level-`level` groups in the interaction list of finest blocks `blocks` (SPEC 1.5).

    All queries of a finest block share their lists at every level (`w_l >= m`).
    Returns `(groups, present)`, both `[len(blocks), 3]`: group indices (possibly outside the
    sequence) and whether the slot belongs to the list (causal lists have 1 or 2 groups).
    """
    beta = blocks >> (level - 1)
    if causal:
        # c = i // (2 w_l), t = (i mod 2 w_l) // w_l: groups 2c-2 and, if t == 1, 2c-1.
        two_c = (beta >> 1) * 2
        groups = torch.stack([two_c - 2, two_c - 1, two_c - 1], dim=-1)
        odd = (beta & 1) == 1
        present = torch.stack([torch.ones_like(odd), odd, torch.zeros_like(odd)], dim=-1)
        return groups, present
    even_list = beta[:, None] + torch.tensor([-2, 2, 3], device=beta.device)
    odd_list = beta[:, None] + torch.tensor([-3, -2, 2], device=beta.device)
    groups = torch.where((beta & 1)[:, None] == 1, odd_list, even_list)
    return groups, torch.ones_like(groups, dtype=torch.bool)


def level_slots(
    geo: FMAGeometry,
    level: int,
    causal: bool,
    scale_attn: bool,
    zero_pad: bool,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coarse slots of every finest block at `level`: `(rows, logw, zero)`, each `[blocks, 3 p_l]`.

    `rows` indexes the level's coarse tokens (-1 where there is none), `logw` is `log rho` of the
    slot (-inf for slots that take no part), `zero` marks zero-key slots (`zero_pad`, outside the
    sequence): logit 0 and value 0, weight `exp(logw)`.
    """
    p_l, s_l = geo.slots[level - 1], geo.windows[level - 1]
    n_groups = geo.n_pad // geo.widths[level - 1]
    groups, present = block_groups(torch.arange(geo.blocks, device=device), level, causal)
    rows = (groups[:, :, None] * p_l + torch.arange(p_l, device=device)).flatten(1)
    present = present[:, :, None].expand(-1, -1, p_l).flatten(1)
    inside = (rows >= 0) & (rows < n_groups * p_l)
    rows = torch.where(inside, rows, -1)
    counts = geo.valid_counts(level, device)[rows.clamp(min=0)]
    rho = counts.double() if scale_attn else torch.ones_like(counts, dtype=torch.float64)
    zero = present & ~inside & zero_pad
    logw = torch.full(rows.shape, -math.inf, dtype=torch.float64, device=device)
    logw = torch.where(present & inside & (counts > 0), rho.log(), logw)
    logw = torch.where(zero, math.log(s_l if scale_attn else 1), logw)
    rows = torch.where(present & inside & (counts > 0), rows, -1)
    return rows, logw, zero


def avgpool_summaries(kp: torch.Tensor, vp: torch.Tensor, geo: FMAGeometry) -> Summaries:
    """Per level, the mean of the real tokens under each window of the zero-padded K and V.

    Args:
        kp, vp: `[B, H, n_pad, D]`, zero beyond the real length.
    Returns:
        `[(ck_l, cv_l)]`, each `[B, H, rows_l, D]`.
    """
    b, h, _, d = kp.shape
    acc = torch.promote_types(kp.dtype, torch.float32)
    out = []
    for level in range(1, geo.levels + 1):
        rows, s = geo.rows[level - 1], geo.windows[level - 1]
        count = geo.valid_counts(level, kp.device).clamp(min=1).to(acc)[:, None]
        pooled = (x.view(b, h, rows, s, d).sum(3, dtype=acc) / count for x in (kp, vp))
        out.append(tuple(t.to(kp.dtype) for t in pooled))
    return out


def fma_reference(
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
) -> torch.Tensor:
    """Fast Multipole Attention, vectorized over finest blocks (O(N (3m + 3 p L)) memory).

    Args:
        q, k, v: `[B, H, N, D]`, any N (padded internally to `m 2^J`, padding masked).
        m: finest block, a power of two (default 64).
        p: coarse tokens per group, a power of two (default 2; `p_l = min(p, w_l)`).
        causal: causal interaction lists (SPEC 1.5).
        scale_attn: weigh each coarse slot by the keys it stands for.
        zero_pad: out-of-sequence slots are zero keys counted in the denominator (authors' code).
        coarse: per-level `(ck_l, cv_l)` summaries `[B, H, rows_l, D]` of the zero-padded K, V
            (learned conv); None takes avgpool.
    Returns:
        `o` `[B, H, N, D]`.
    """
    b, h, n, d = q.shape
    geo = fma_geometry(n, m, p)
    dev = q.device
    scale = d**-0.5
    n_q = -(-n // m)  # query blocks holding a real query; the others are never computed
    kp, vp = (F.pad(t, (0, 0, 0, geo.n_pad - n)) for t in (k, v))
    qb = F.pad(q, (0, 0, 0, n_q * m - n)).view(b, h, n_q, m, d)
    blocks = torch.arange(n_q, device=dev)

    # Level 0: blocks b-1, b, b+1 from a copy of K, V with one zero block on each side, so that
    # out-of-sequence near keys are zero keys (logit 0) and zero values.
    j = (blocks[:, None] - 1) * m + torch.arange(3 * m, device=dev)  # [n_q, 3m]
    kn, vn = (F.pad(t, (0, 0, m, m))[:, :, j + m] for t in (kp, vp))  # [B, H, n_q, 3m, D]
    scores0 = torch.einsum("bhnid,bhnjd->bhnij", qb, kn) * scale
    outside = (j < 0) | (j >= geo.n_pad)
    keep = ((j >= 0) & (j < n)) | (outside & zero_pad)
    keep = keep[:, None, :]
    if causal:
        i = blocks[:, None] * m + torch.arange(m, device=dev)
        keep = keep & (j[:, None, :] <= i[:, :, None])
    parts = [(scores0.masked_fill(~keep, -math.inf), vn)]

    summaries = coarse if coarse is not None else avgpool_summaries(kp, vp, geo)
    for level, (ck, cv) in enumerate(summaries, start=1):
        rows, logw, _ = level_slots(geo, level, causal, scale_attn, zero_pad, dev)
        rows, logw = rows[:n_q], logw[:n_q].to(torch.promote_types(q.dtype, torch.float32))
        # Row `rows_l` of the padded summaries is zero: the key and value of zero and absent slots.
        gather = torch.where(rows >= 0, rows, ck.shape[2])
        cks, cvs = (F.pad(t, (0, 0, 0, 1))[:, :, gather] for t in (ck, cv))  # [B, H, n_q, 3p_l, D]
        parts.append((torch.einsum("bhnid,bhnjd->bhnij", qb, cks) * scale + logw[:, None, :], cvs))

    scores = torch.cat([s for s, _ in parts], dim=-1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    probs = probs.to(v.dtype).split([s.shape[-1] for s, _ in parts], dim=-1)
    out = sum(torch.einsum("bhnij,bhnjd->bhnid", pr, vals) for pr, (_, vals) in zip(probs, parts))
    return out.reshape(b, h, n_q * m, d)[:, :, :n]


# ---------------------------------------------------------------------------------------------
# Module (learned conv summaries) and registration
# ---------------------------------------------------------------------------------------------
def _make_conv(d: int, s: int, gen: torch.Generator) -> nn.Conv1d:
    """Conv1d(D, D, s, stride=s) starting near the averaging kernel (a sane summary at init)."""
    conv = nn.Conv1d(d, d, s, stride=s)
    with torch.no_grad():
        noise = torch.randn(d, d, s, generator=gen) * (0.3 / (s * math.sqrt(d)))
        conv.weight.copy_(torch.eye(d)[:, :, None] / s + noise)
        conv.bias.copy_(0.01 * torch.randn(d, generator=gen))
    return conv


def _conv_pool(xp: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """`conv` over the sequence of `xp` `[B, H, n_pad, D]` (kernel = stride = s) as one matmul."""
    b, h, n_pad, d = xp.shape
    s = conv.stride[0]
    # conv1d: out[r, o] = sum_{t, i} w[o, i, t] x[r s + t, i] + bias[o]
    weight = conv.weight.to(xp.dtype).permute(2, 1, 0).reshape(s * d, d)
    return (xp.reshape(b, h, n_pad // s, s * d) @ weight) + conv.bias.to(xp.dtype)


class FMAAttention(nn.Module):
    """Fast Multipole Attention for one sequence length, with optional learned conv summaries.

    `impl` computes the attention from `(q, k, v)` and the keyword parameters of
    `fma_reference` (which it defaults to); `fma_triton` plugs in the Triton kernels.
    """

    def __init__(
        self,
        seq_len: int,
        head_dim: int,
        *,
        m: int = 64,
        p: int = 2,
        causal: bool = False,
        scale_attn: bool = True,
        zero_pad: bool = False,
        downsample: str = "avgpool",
        impl: Callable | None = None,
    ):
        super().__init__()
        if downsample not in FMA_CHOICES["downsample"]:
            choices = FMA_CHOICES["downsample"]
            raise ValueError(f"downsample must be one of {choices}, got {downsample!r}")
        self.geo = fma_geometry(seq_len, m, p)
        self.kwargs = dict(m=m, p=p, causal=causal, scale_attn=scale_attn, zero_pad=zero_pad)
        self.downsample = downsample
        self.impl = impl or fma_reference
        if downsample == "conv":
            gen = torch.Generator().manual_seed(CONV_SEED)
            self.conv_k = nn.ModuleList(_make_conv(head_dim, s, gen) for s in self.geo.windows)
            self.conv_v = nn.ModuleList(_make_conv(head_dim, s, gen) for s in self.geo.windows)

    def summaries(self, k: torch.Tensor, v: torch.Tensor) -> Summaries:
        """Learned per-level `(ck_l, cv_l)` of the zero-padded K, V (conv downsampling)."""
        pad = self.geo.n_pad - k.shape[2]
        kp, vp = (F.pad(t, (0, 0, 0, pad)) for t in (k, v))
        convs = zip(self.conv_k, self.conv_v)
        return [(_conv_pool(kp, ck), _conv_pool(vp, cv)) for ck, cv in convs]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[2] != self.geo.n:
            raise ValueError(f"this FMAAttention was built for N={self.geo.n}, got N={q.shape[2]}")
        coarse = self.summaries(k, v) if self.downsample == "conv" else None
        return self.impl(q, k, v, coarse=coarse, **self.kwargs)


def check_fma(shape: Shape, params: dict) -> str | None:
    for name in ("m", "p"):
        if not (isinstance(params[name], int) and _is_pow2(params[name])):
            return f"fma {name} must be a power of two >= 1, got {params[name]!r}"
    return None


@functools.lru_cache(maxsize=256)
def fma_pairs(n: int, m: int, p: int, causal: bool) -> int:
    """Query-slot pairs FMA computes for the n real queries (zero-key slots cost nothing)."""
    geo = fma_geometry(n, m, p)
    i = torch.arange(n)
    b = i // m
    lo = ((b - 1) * m).clamp(min=0)
    near = (i + 1 - lo) if causal else (((b + 2) * m).clamp(max=n) - lo)
    total = int(near.sum())
    per_block = torch.clamp(n - torch.arange(geo.blocks) * m, 0, m)  # real queries per block
    for level in range(1, geo.levels + 1):
        rows, _, _ = level_slots(geo, level, causal, True, False)
        total += int(((rows >= 0).sum(1) * per_block).sum())
    return total


def conv_param_count(shape: Shape, params: dict) -> int:
    """Learnable parameters of the conv summaries (0 for avgpool)."""
    if params["downsample"] != "conv":
        return 0
    geo = fma_geometry(shape.seq_len, params["m"], params["p"])
    d = shape.head_dim
    return 2 * sum(d * d * s + d for s in geo.windows)


def fma_flops(shape: Shape, params: dict) -> float:
    """q.k and p.v over every query-slot pair, plus the conv summaries' matmuls."""
    pairs = fma_pairs(shape.seq_len, params["m"], params["p"], shape.causal)
    flops = 4.0 * shape.batch * shape.heads * shape.head_dim * pairs
    if params["downsample"] == "conv":
        geo = fma_geometry(shape.seq_len, params["m"], params["p"])
        flops += 4.0 * shape.batch * shape.heads * geo.n_pad * shape.head_dim**2 * geo.levels
    return flops


def fma_min_bytes(shape: Shape, params: dict) -> float:
    """q, k, v read and o written once, plus the conv weights (fp32) read once."""
    return qkvo_bytes(shape) + 4.0 * conv_param_count(shape, params)


@register_variant(
    "fma",
    family="multipole",
    params=FMA_PARAMS,
    short=FMA_SHORT,
    choices=FMA_CHOICES,
    check=check_fma,
    flops=fma_flops,
    min_bytes=fma_min_bytes,
)
def make_fma(shape: Shape, m: int, p: int, downsample: str, scale_attn: bool, zero_pad: bool):
    """Fast Multipole Attention, PyTorch reference: exact near field, multilevel summaries."""
    return FMAAttention(
        shape.seq_len, shape.head_dim, m=m, p=p, causal=shape.causal,
        scale_attn=scale_attn, zero_pad=zero_pad, downsample=downsample,
    )  # fmt: skip
