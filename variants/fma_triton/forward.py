"""FMA forward: flash-style online softmax per query tile over the near key tiles (finest
blocks b-1..b+1), then over the tile's coarse tokens gathered through the plan's table, with
log rho added to the logits; zero-key slots (`zero_pad`) enter as one extra slot of logit
`log(sum of their rho)`."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from variants.fma_triton.configs import BLOCKS, LaunchConfig, fma_config, precision
from variants.fma_triton.plan import FMAPlan, fma_plan
from variants.fma_triton.pool import pool
from variants.triton_common import LN2_C, LOG2E, LOG2E_C, check_qkv, dot, empty


@triton.jit
def _softmax_step(acc, m_i, l_i, s, vt, PRECISION: tl.constexpr):
    """One online-softmax update with logits `s` (log2 units, -inf = excluded) and values `vt`."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no slot yet keeps m = -inf; exponentiate against 0 instead (all 0s).
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    # [BLOCK_M, BLOCK_N]
    p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = dot(p.to(vt.dtype), vt, acc * alpha[:, None], PRECISION)
    return acc, m_new, l_i


@triton.jit
def near_range(m0, N, M: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """Keys [lo, hi) that can be near keys of the query tile [m0, m0 + BLOCK_M)."""
    first = m0 // M
    last = (m0 + BLOCK_M - 1) // M
    lo = tl.maximum(first * M - M, 0)
    if CAUSAL:
        hi = tl.minimum(m0 + BLOCK_M, N)
    else:
        hi = tl.minimum(last * M + 2 * M, N)
    return lo, hi


@triton.jit
def near_mask(offs_m, offs_n, hi, M: tl.constexpr, QB: tl.constexpr, CAUSAL: tl.constexpr):
    """[BLOCK_M, BLOCK_N] level-0 membership: the key's block is at most one from the query's."""
    keep = (offs_n < hi)[None, :] & (offs_m >= 0)[:, None]
    if QB > 1:  # the tile spans several finest blocks, each with its own neighbours
        blk_m = (offs_m // M)[:, None]
        blk_n = (offs_n // M)[None, :]
        keep = keep & (blk_n + 1 >= blk_m) & (blk_n <= blk_m + 1)
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None])
    return keep


@triton.jit
def _fma_fwd_near(
    acc, m_i, l_i, q, k_ptr, v_ptr, offs_m, start, stop, hi, qk_scale,
    M: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, QB: tl.constexpr, MASK: tl.constexpr,
):
    """Near key tiles [start, stop); MASK=False for tiles every query of the tile may see."""
    offs_d = tl.arange(0, HEAD_DIM)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_offs = offs_n[:, None] * HEAD_DIM + offs_d[None, :]
        # [BLOCK_N, HEAD_DIM]
        if MASK:
            kt = tl.load(k_ptr + kv_offs, mask=(offs_n < hi)[:, None], other=0.0)
            vt = tl.load(v_ptr + kv_offs, mask=(offs_n < hi)[:, None], other=0.0)
        else:
            kt = tl.load(k_ptr + kv_offs)
            vt = tl.load(v_ptr + kv_offs)
        # [BLOCK_M, BLOCK_N], log2 units
        s = dot(q, tl.trans(kt), None, PRECISION) * qk_scale
        if MASK:
            s = tl.where(near_mask(offs_m, offs_n, hi, M, QB, CAUSAL), s, float("-inf"))
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, vt, PRECISION)
    return acc, m_i, l_i


@triton.jit
def coarse_tile(idx_ptr, logw_ptr, bits_ptr, ck_ptr, cv_ptr, tab_ptr, c0,
                 HEAD_DIM: tl.constexpr, BLOCK_C: tl.constexpr):
    """Slots [c0, c0 + BLOCK_C) of a tile's coarse table (past the used prefix: row -1, log rho
    -inf): coarse row, log2 rho, the bits of the finest blocks using it, the offsets of its
    `[BLOCK_C, HEAD_DIM]` summaries and the summaries."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    idx = tl.load(idx_ptr + tab_ptr + offs_c)
    logw = tl.load(logw_ptr + tab_ptr + offs_c) * LOG2E_C
    bits = tl.load(bits_ptr + tab_ptr + offs_c)
    c_offs = idx.to(tl.int64)[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    ckt = tl.load(ck_ptr + c_offs, mask=(idx >= 0)[:, None], other=0.0)
    cvt = tl.load(cv_ptr + c_offs, mask=(idx >= 0)[:, None], other=0.0)
    return idx, logw, bits, c_offs, ckt, cvt


@triton.jit
def _coarse_step(acc, m_i, l_i, q, idx, logw, bits, ckt, cvt, local, qk_scale,
                 PRECISION: tl.constexpr, QB: tl.constexpr):
    """Online-softmax update over one coarse tile; bit b of `bits` says whether finest block b
    of the query tile uses the slot."""
    # [BLOCK_M, BLOCK_C]
    s = dot(q, tl.trans(ckt), None, PRECISION) * qk_scale + logw[None, :]
    if QB > 1:  # (one block per tile: its unused slots already have logw = -inf)
        use = ((bits[None, :] >> local[:, None]) & 1) != 0
        s = tl.where(use, s, float("-inf"))
    return _softmax_step(acc, m_i, l_i, s, cvt, PRECISION)


@triton.jit(do_not_specialize=["N", "N_SLOTS"])
def _fma_fwd_kernel(
    q_ptr, k_ptr, v_ptr, ck_ptr, cv_ptr, idx_ptr, logw_ptr, bits_ptr, used_ptr, zlog_ptr, o_ptr,
    lse_ptr, N, TOTAL_ROWS, N_SLOTS, qk_scale,
    M: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, QB: tl.constexpr,
    SB: tl.constexpr,
):
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)  # int64: B*H*N*D may pass 2**31
    head = bh * N * HEAD_DIM
    q_ptr += head
    k_ptr += head
    v_ptr += head
    o_ptr += head
    ck_ptr += bh * TOTAL_ROWS * HEAD_DIM
    cv_ptr += bh * TOTAL_ROWS * HEAD_DIM
    lse_ptr += bh * N

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N
    qo_offs = offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    # [BLOCK_M, HEAD_DIM]
    q = tl.load(q_ptr + qo_offs, mask=row_ok[:, None], other=0.0)

    # Zero-key slots (zero_pad) of the row's block: one slot of logit log(sum of their rho).
    # [BLOCK_M]
    m_i = tl.load(zlog_ptr + offs_m // M, mask=row_ok, other=float("-inf")) * LOG2E_C
    l_i = tl.where(m_i > float("-inf"), 1.0, 0.0)
    # [BLOCK_M, HEAD_DIM]
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # The tile's coarse tokens: only the table's used prefix is walked (causal tiles use from
    # 2 to 4 tokens per level). Causal: the first coarse tile is gathered before the near
    # field, whose work hides the latency of its two dependent loads (table row, then
    # summaries). Non-causal tiles hold three near tiles in flight already, and the extra
    # registers made them slower.
    tab_ptr = (m0 // SB) * N_SLOTS
    used = tl.load(used_ptr + m0 // SB)
    if CAUSAL:
        idx, logw, bits, _, ckt, cvt = coarse_tile(idx_ptr, logw_ptr, bits_ptr, ck_ptr, cv_ptr,
                                                    tab_ptr, 0, HEAD_DIM, BLOCK_C)
    lo, hi = near_range(m0, N, M, BLOCK_M, CAUSAL)
    # Tiles in [lo, mid) need no mask: with one finest block per tile every key of [lo, hi) is
    # near, and causal tiles ending at or before the tile's first query see no future key.
    mid = lo
    if QB == 1:
        if CAUSAL:
            safe = m0 + 1
        else:
            safe = hi
        mid = lo + (tl.maximum(safe - lo, 0) // BLOCK_N) * BLOCK_N
    acc, m_i, l_i = _fma_fwd_near(
        acc, m_i, l_i, q, k_ptr, v_ptr, offs_m, lo, mid, hi, qk_scale,
        M, HEAD_DIM, CAUSAL, PRECISION, BLOCK_N, QB, False,
    )  # fmt: skip
    acc, m_i, l_i = _fma_fwd_near(
        acc, m_i, l_i, q, k_ptr, v_ptr, offs_m, mid, hi, hi, qk_scale,
        M, HEAD_DIM, CAUSAL, PRECISION, BLOCK_N, QB, True,
    )  # fmt: skip

    local = offs_m // M - (m0 // SB) * QB
    first = 0
    if CAUSAL:
        if used > 0:
            acc, m_i, l_i = _coarse_step(acc, m_i, l_i, q, idx, logw, bits, ckt, cvt, local,
                                         qk_scale, PRECISION, QB)
        first = BLOCK_C
    for c0 in range(first, used, BLOCK_C):
        idx, logw, bits, _, ckt, cvt = coarse_tile(idx_ptr, logw_ptr, bits_ptr, ck_ptr, cv_ptr,
                                                    tab_ptr, c0, HEAD_DIM, BLOCK_C)
        acc, m_i, l_i = _coarse_step(acc, m_i, l_i, q, idx, logw, bits, ckt, cvt, local,
                                     qk_scale, PRECISION, QB)

    l_i = tl.where(l_i > 0.0, l_i, 1.0)  # rows past N only; never stored
    tl.store(o_ptr + qo_offs, (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + offs_m, (m_i + tl.math.log2(l_i)) * LN2_C, mask=row_ok)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: int) -> None:
    """Raise ValueError for what the kernels do not support."""
    check_qkv("fma_triton", q, k, v)
    if m not in BLOCKS:
        raise ValueError(f"fma_triton needs m in {BLOCKS}, got {m}")


def common(q: torch.Tensor, plan: FMAPlan, cfg: LaunchConfig) -> dict:
    """Launch arguments the forward and both backward attention kernels share."""
    return dict(
        M=plan.geo.m, HEAD_DIM=q.shape[-1], CAUSAL=plan.causal, PRECISION=precision(q.dtype),
        num_warps=cfg.num_warps,
    )  # fmt: skip


def fma_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    m: int = 64,
    p: int = 2,
    causal: bool = False,
    scale_attn: bool = True,
    zero_pad: bool = False,
    coarse: tuple[torch.Tensor, torch.Tensor] | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: LaunchConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """FMA forward.

    Args:
        q, k, v: `[B, H, N, D]`, one dtype of fp16/bf16/fp32, D in {16, 32, 64, 128}, any N.
        m, p, causal, scale_attn, zero_pad: as in `variants.fma.fma_reference` (m in 16..256).
        coarse: `(ck, cv)` `[B, H, total_rows, D]`, the levels-concatenated summaries (learned
            conv); None computes the avgpool summaries.
        out: optional preallocated `(o, lse)` to write into.
        config: launch config (default `fma_config(m, causal, D, q.device)`).

    Returns:
        `(o, lse, ck, cv)`: `o` `[B, H, N, D]`, `lse` `[B, H, N]` fp32 (natural log of the
        weighted sum of exponentials over all slots), and the summaries used.
    """
    check_inputs(q, k, v, m)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, h, n, d = q.shape
    cfg = config or fma_config(m, causal, d, q.device)
    plan = fma_plan(n, m, p, causal, scale_attn, zero_pad, cfg.block_m, cfg.coarse_tile,
                    str(q.device))
    ck, cv = (t.contiguous() for t in coarse) if coarse is not None else pool(k, v, plan, cfg)
    o = out[0] if out else empty(q.shape, q.dtype, q.device)
    lse = out[1] if out else empty(q.shape[:-1], torch.float32, q.device)
    _fma_fwd_kernel[(triton.cdiv(n, cfg.block_m), b * h)](
        q, k, v, ck, cv, plan.idx, plan.logw, plan.bits, plan.used, plan.zlog, o, lse,
        n, plan.geo.total_rows, plan.n_slots, d**-0.5 * LOG2E,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.fwd_block_n, BLOCK_C=plan.block_c, QB=plan.qb,
        SB=max(cfg.block_m, m), **common(q, plan, cfg), **cfg.fwd_launch(),
    )  # fmt: skip
    return o, lse, ck, cv
