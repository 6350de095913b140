"""FMA backward (FlashAttention-2 style, recomputing P from the saved logsumexp):
`_fma_bwd_dq_kernel` per query tile computes delta, dQ and the coarse tokens' gradients
(P^T dO and dS^T Q, added with fp32 atomics since many tiles share a coarse token);
`_fma_pushdown_kernel` folds the coarse gradients of all levels down to level-1 windows (the
avgpool adjoint, divided by the counts); `_fma_bwd_dkdv_kernel` per key tile computes the
near-field dK, dV and adds the folded coarse gradient of its window."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from variants.fma_triton.configs import LaunchConfig, fma_config
from variants.fma_triton.forward import check_inputs, coarse_tile, common, near_mask, near_range
from variants.fma_triton.plan import fma_plan
from variants.triton_common import (
    LOG2E,
    LOG2E_C,
    dot,
    empty,
    softmax_bwd_head,
    softmax_dq_rows,
    softmax_kv_cols,
)


@triton.jit(do_not_specialize=["N", "N_SLOTS"])
def _fma_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, ck_ptr, cv_ptr, idx_ptr, logw_ptr, bits_ptr, used_ptr, o_ptr, do_ptr,
    lse_ptr, delta_ptr, dq_ptr, dck_ptr, dcv_ptr, N, TOTAL_ROWS, N_SLOTS, qk_scale, sm_scale,
    M: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, QB: tl.constexpr,
    SB: tl.constexpr,
):
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    q_ptr, k_ptr, v_ptr, do_ptr, o_ptr, dq_ptr, lse_ptr, delta_ptr = softmax_bwd_head(
        q_ptr, k_ptr, v_ptr, do_ptr, o_ptr, dq_ptr, lse_ptr, delta_ptr, bh, N, HEAD_DIM)
    ck_ptr += bh * TOTAL_ROWS * HEAD_DIM
    cv_ptr += bh * TOTAL_ROWS * HEAD_DIM
    dck_ptr += bh * TOTAL_ROWS * HEAD_DIM
    dcv_ptr += bh * TOTAL_ROWS * HEAD_DIM

    offs_m, offs_d, row_ok, qo_offs, q, do, delta, lse2 = softmax_dq_rows(
        q_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, m0, N, HEAD_DIM, BLOCK_M)
    # [BLOCK_M, HEAD_DIM]
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    lo, hi = near_range(m0, N, M, BLOCK_M, CAUSAL)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_offs = offs_n[:, None] * HEAD_DIM + offs_d[None, :]
        # [BLOCK_N, HEAD_DIM]
        kt = tl.load(k_ptr + kv_offs, mask=(offs_n < hi)[:, None], other=0.0)
        vt = tl.load(v_ptr + kv_offs, mask=(offs_n < hi)[:, None], other=0.0)
        # [BLOCK_M, BLOCK_N]
        p = tl.math.exp2(dot(q, tl.trans(kt), None, PRECISION) * qk_scale - lse2[:, None])
        keep = near_mask(offs_m, offs_n, hi, M, QB, CAUSAL) & row_ok[:, None]
        p = tl.where(keep, p, 0.0)
        ds = p * (dot(do, tl.trans(vt), None, PRECISION) - delta[:, None])
        dq = dot(ds.to(kt.dtype), kt, dq, PRECISION)

    local = offs_m // M - (m0 // SB) * QB
    tab_ptr = (m0 // SB) * N_SLOTS
    used = tl.load(used_ptr + m0 // SB)
    for c0 in range(0, used, BLOCK_C):
        idx, logw, bits, c_offs, ckt, cvt = coarse_tile(
            idx_ptr, logw_ptr, bits_ptr, ck_ptr, cv_ptr, tab_ptr, c0, HEAD_DIM, BLOCK_C)
        c_ok = (idx >= 0)[:, None]
        # [BLOCK_M, BLOCK_C]
        s = dot(q, tl.trans(ckt), None, PRECISION) * qk_scale + logw[None, :]
        keep = (((bits[None, :] >> local[:, None]) & 1) != 0) & row_ok[:, None]
        p = tl.where(keep, tl.math.exp2(s - lse2[:, None]), 0.0)
        ds = p * (dot(do, tl.trans(cvt), None, PRECISION) - delta[:, None])
        dq = dot(ds.to(ckt.dtype), ckt, dq, PRECISION)
        # [BLOCK_C, HEAD_DIM]: this tile's share of the coarse tokens' gradients
        dcv = dot(tl.trans(p).to(do.dtype), do, None, PRECISION)
        dck = dot(tl.trans(ds).to(q.dtype), q, None, PRECISION) * sm_scale
        tl.atomic_add(dcv_ptr + c_offs, dcv, mask=c_ok, sem="relaxed")
        tl.atomic_add(dck_ptr + c_offs, dck, mask=c_ok, sem="relaxed")

    tl.store(dq_ptr + qo_offs, (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit(do_not_specialize=["N"])
def _fma_pushdown_kernel(
    dck_ptr, dcv_ptr, gk_ptr, gv_ptr, off_ptr, win_ptr, N, LEVELS, ROWS1, TOTAL_ROWS, WIN1,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Avgpool adjoint, folded to level-1 windows: g[r] = sum_l dC_l[row_l(r)] / count_l(row)."""
    bh = tl.program_id(1).to(tl.int64)
    dck_ptr += bh * TOTAL_ROWS * HEAD_DIM
    dcv_ptr += bh * TOTAL_ROWS * HEAD_DIM
    gk_ptr += bh * ROWS1 * HEAD_DIM
    gv_ptr += bh * ROWS1 * HEAD_DIM
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, HEAD_DIM)[None, :]
    ok = (rows < ROWS1)[:, None]
    # [BLOCK_R, HEAD_DIM]
    acc_k = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)
    for lvl in range(0, LEVELS):
        off = tl.load(off_ptr + lvl)
        win = tl.load(win_ptr + lvl)
        row = (rows * WIN1) // win
        count = tl.maximum(tl.minimum(N - row * win, win), 1).to(tl.float32)[:, None]
        src = (off + row)[:, None] * HEAD_DIM + offs_d
        acc_k += tl.load(dck_ptr + src, mask=ok, other=0.0) / count
        acc_v += tl.load(dcv_ptr + src, mask=ok, other=0.0) / count
    dst = rows[:, None] * HEAD_DIM + offs_d
    tl.store(gk_ptr + dst, acc_k, mask=ok)
    tl.store(gv_ptr + dst, acc_v, mask=ok)


@triton.jit(do_not_specialize=["N"])
def _fma_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, gk_ptr, gv_ptr, dk_ptr, dv_ptr,
    N, ROWS1, WIN1, qk_scale, sm_scale,
    M: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    POOL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    n0 = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, lse_ptr, delta_ptr = softmax_bwd_head(
        q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, lse_ptr, delta_ptr, bh, N, HEAD_DIM)
    offs_n, offs_d, col_ok, kv_offs, kt, vt = softmax_kv_cols(k_ptr, v_ptr, n0, N, HEAD_DIM,
                                                              BLOCK_N)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # The key tile lies in block kb (BLOCK_N divides m); its near queries are in blocks
    # kb-1..kb+1 (causal: kb from the tile on, and kb+1).
    kb = n0 // M
    if CAUSAL:
        lo = n0
    else:
        lo = tl.maximum(kb * M - M, 0)
    hi = tl.minimum(kb * M + 2 * M, N)
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < hi
        qo_offs = offs_m[:, None] * HEAD_DIM + offs_d[None, :]
        # [BLOCK_M, HEAD_DIM]
        q = tl.load(q_ptr + qo_offs, mask=m_ok[:, None], other=0.0)
        do = tl.load(do_ptr + qo_offs, mask=m_ok[:, None], other=0.0)
        # [BLOCK_M]
        lse2 = tl.load(lse_ptr + offs_m, mask=m_ok, other=0.0) * LOG2E_C
        delta = tl.load(delta_ptr + offs_m, mask=m_ok, other=0.0)
        # [BLOCK_N, BLOCK_M]
        pt = tl.math.exp2(dot(kt, tl.trans(q), None, PRECISION) * qk_scale - lse2[None, :])
        keep = m_ok[None, :] & (offs_n >= 0)[:, None]
        if CAUSAL:
            keep = keep & (offs_m[None, :] >= offs_n[:, None])
        pt = tl.where(keep, pt, 0.0)
        dv = dot(pt.to(do.dtype), do, dv, PRECISION)
        dst = pt * (dot(vt, tl.trans(do), None, PRECISION) - delta[None, :])
        dk = dot(dst.to(q.dtype), q, dk, PRECISION)
    dk = dk * sm_scale
    if POOL:  # the avgpool adjoint of every level, folded to this key's level-1 window
        g_offs = bh * ROWS1 * HEAD_DIM + (offs_n // WIN1)[:, None] * HEAD_DIM + offs_d[None, :]
        dk += tl.load(gk_ptr + g_offs, mask=col_ok[:, None], other=0.0)
        dv += tl.load(gv_ptr + g_offs, mask=col_ok[:, None], other=0.0)
    tl.store(dk_ptr + kv_offs, dk.to(dk_ptr.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv_ptr + kv_offs, dv.to(dv_ptr.dtype.element_ty), mask=col_ok[:, None])


def fma_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    ck: torch.Tensor,
    cv: torch.Tensor,
    *,
    m: int = 64,
    p: int = 2,
    causal: bool = False,
    scale_attn: bool = True,
    zero_pad: bool = False,
    pool_adjoint: bool = True,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    config: LaunchConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """FMA backward.

    Args:
        q, k, v, o, lse, ck, cv: as given to and returned by `fma_fwd`.
        do: `[B, H, N, D]` gradient of the loss with respect to `o`.
        pool_adjoint: add the avgpool summaries' share to dk, dv (False for given summaries,
            whose gradients `dck`, `dcv` the caller propagates).
        out: optional preallocated `(dq, dk, dv)` to write into.

    Returns:
        `(dq, dk, dv, dck, dcv)`: input-dtype gradients of q, k, v (dk, dv including the avgpool
        adjoint when `pool_adjoint`) and fp32 gradients of the summaries `[B, H, total_rows, D]`.
    """
    check_inputs(q, k, v, m)
    q, k, v, o, lse = (t.contiguous() for t in (q, k, v, o, lse))
    do = do.to(q.dtype).contiguous()
    b, h, n, d = q.shape
    cfg = config or fma_config(m, causal, d, q.device)
    plan = fma_plan(n, m, p, causal, scale_attn, zero_pad, cfg.block_m, cfg.coarse_tile,
                    str(q.device))
    geo = plan.geo
    dq, dk, dv = out if out else (empty(q.shape, q.dtype, q.device) for _ in range(3))
    delta = empty(lse.shape, torch.float32, q.device)
    dc = torch.zeros((2, b, h, geo.total_rows, d), dtype=torch.float32, device=q.device)
    shared = common(q, plan, cfg)
    qk_scale, sm_scale = d**-0.5 * LOG2E, d**-0.5
    # dQ first: it also writes delta and the coarse gradients, which the dK/dV kernel reads.
    _fma_bwd_dq_kernel[(triton.cdiv(n, cfg.block_m), b * h)](
        q, k, v, ck, cv, plan.idx, plan.logw, plan.bits, plan.used, o, do, lse, delta, dq,
        dc[0], dc[1],
        n, geo.total_rows, plan.n_slots, qk_scale, sm_scale,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.bwd_block_n, BLOCK_C=plan.block_c, QB=plan.qb,
        SB=max(cfg.block_m, m), **cfg.bwd_launch("dq"), **shared,
    )  # fmt: skip
    pool = pool_adjoint and geo.levels > 0
    rows1, win1 = (geo.rows[0], geo.windows[0]) if geo.levels else (1, 1)
    g = empty((2, b, h, rows1, d), torch.float32, q.device) if pool else dc
    if pool:
        block_r = 64
        _fma_pushdown_kernel[(triton.cdiv(rows1, block_r), b * h)](
            dc[0], dc[1], g[0], g[1], plan.level_off, plan.level_win, n, geo.levels, rows1,
            geo.total_rows, win1, HEAD_DIM=d, BLOCK_R=block_r,
        )
    _fma_bwd_dkdv_kernel[(triton.cdiv(n, cfg.bwd_block_n), b * h)](
        q, k, v, do, lse, delta, g[0], g[1], dk, dv, n, rows1, win1, qk_scale, sm_scale,
        POOL=pool, BLOCK_M=cfg.dkdv_m, BLOCK_N=cfg.bwd_block_n, **cfg.bwd_launch("dkdv"),
        **shared,
    )  # fmt: skip
    return dq, dk, dv, dc[0], dc[1]
