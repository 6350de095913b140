"""FMMformer backward. Non-causal: dq per query tile (far field, then band), a weighted state
pass for the dual states, dk and dv per key tile. Causal: per far-field map a query-side walk
over the forward's chunks, a suffix scan of the chunks' dual sums and a key-side walk; then the
band's dq and dk, dv (see the package docstring)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from variants.fmmformer_triton.configs import FMMConfig, fmm_config
from variants.fmmformer_triton.forward import qkv_tile
from variants.fmmformer_triton.states import (
    Saved,
    dot_prec,
    load_state,
    lowp,
    mm,
    scan,
    state_chunk_rows,
    state_pass,
    state_ptrs,
    store_state,
)
from variants.linear import EPS
from variants.triton_common import (
    LOG2E,
    band_limit,
    dot,
    empty,
    phi_grad,
    phi_one,
    phi_one_grad,
    phi_prep,
)


@triton.jit
def _far_bwd_q(dq, dfar, q, eq, rq, do, wf, rows, N, SP, ZP, eps, DEN, DDEN, which,
               LOWP: tl.constexpr, DOT_PREC: tl.constexpr):
    """Non-causal far term l of dq for one query tile from the global state at SP, ZP. Also
    adds dO . Far_l to the rows' `dfar` (their share of dL/dw_far) and stores den_l and
    dL/d den_l per row.

    With Far_l = num / den: dnum = w_far dO / den and dden = -w_far (dO . Far_l) / den.
    num = phi(q) S, so with G = dO S^T: dO . num = phi(q) . G and dphi(q) = (w_far / den) G +
    dden z: num itself is never formed."""
    s_m = mm(tl.load(SP), q, LOWP)
    z = tl.load(ZP)
    # G = dO S^T, [BLOCK_M, D], formed after phi_l' (measured faster than before it)
    fq, dphi = phi_grad(q, eq, rq, which)
    den = tl.sum(fq * z[None, :], 1) + eps
    g = dot(mm(do, q, LOWP), tl.trans(s_m), None, DOT_PREC)
    fdo = tl.sum(fq * g, 1) / den
    dden = -wf * fdo / den
    dfq = g * (wf / den)[:, None] + dden[:, None] * z[None, :]
    tl.store(DEN + which * N + rows, den, mask=rows < N)
    tl.store(DDEN + which * N + rows, dden, mask=rows < N)
    return dq + dfq * dphi, dfar + fdo


@triton.jit
def _far_bwd_kv(dk, dv, k, ek, rk, v, UP, UZP, which,
                LOWP: tl.constexpr, DOT_PREC: tl.constexpr):
    """Non-causal far term l of dk, dv for one key tile from the global dual state
    U = sum_i phi(q_i) dnum_i^T and u = sum_i phi(q_i) dden_i at UP, UZP."""
    u_m = mm(tl.load(UP), v, LOWP)
    uz = tl.load(UZP)
    fk, dphi = phi_grad(k, ek, rk, which)
    # [BLOCK_M, D]
    dfk = dot(mm(v, v, LOWP), tl.trans(u_m), None, DOT_PREC) + uz[None, :]
    dv = dot(mm(fk, v, LOWP), u_m, dv, DOT_PREC)
    return dk + dfk * dphi, dv


# A row max below every score: rows past N, and rows before their band's first key tile.
NO_KEY = tl.constexpr(-1.0e30)


@triton.jit
def _near_bwd_tile(q, do, K, V, start, rows, ok, hi, bandwidth, right,
                   BLOCK_N: tl.constexpr, D: tl.constexpr, DOT_PREC: tl.constexpr):
    """One key tile of a query tile's band: the raw scores q . k_j (-inf outside the band;
    `[BLOCK_M, BLOCK_N]`), dO . v_j for those keys and the keys."""
    cols = start + tl.arange(0, BLOCK_N)
    # [BLOCK_N, D]
    band = cols[:, None] * D + tl.arange(0, D)[None, :]
    kb = tl.load(K + band, mask=cols[:, None] < hi, other=0.0)
    vb = tl.load(V + band, mask=cols[:, None] < hi, other=0.0)
    # [BLOCK_M, BLOCK_N]
    rel = cols[None, :] - rows[:, None]
    keep = (rel >= -bandwidth) & (rel <= right) & (cols < hi)[None, :] & ok[:, None]
    raw = tl.where(keep, dot(q, tl.trans(kb), None, DOT_PREC), float("-inf"))
    dov = dot(do, tl.trans(vb), None, DOT_PREC)
    return raw, dov, kb


@triton.jit
def _near_bwd_q(dq, q, do, K, V, m0, rows, ok, N, bandwidth, right, qk_scale, sm_scale, wn,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                DOT_PREC: tl.constexpr):
    """The band's share of dq for one query tile, added to dq, in two walks over the key tiles
    that meet the band.

    The band's softmax is recomputed from these scores alone: the first walk keeps, per row in
    fp32, the raw score max m, l = sum_j P~_ij and dO . Near = sum_j P~_ij (dO_i . v_j) / l with
    P~_ij = exp2((s_ij - m) qk_scale), online as in the forward. The forward's log-sum-exp is
    not used: its scores can differ from these in their last bits (another tile shape, a
    multiply fused into a subtraction), and a last bit of a large score moves P by more than
    the gradient's precision. With the max taken from the same values, a row whose band holds
    one key (or whose other keys underflow) has P exactly 1 and dS exactly 0, as in the dense
    math. The second walk adds dS K with dS = P (w_near dP - w_near dO . Near), the delta from
    the band alone, never from o minus the far terms (a difference that loses the band's
    digits when the far field dominates o). Returns dq, dO . Near (for dL/dw_near and the key
    side), m and 1 / l."""
    m = tl.full([BLOCK_M], NO_KEY, dtype=tl.float32)
    psum = tl.zeros([BLOCK_M], dtype=tl.float32)
    dnear = tl.zeros([BLOCK_M], dtype=tl.float32)
    lo = tl.maximum(m0 - bandwidth, 0)
    hi = tl.minimum(m0 + BLOCK_M + right, N)
    for start in range(lo, hi, BLOCK_N):
        raw, dov, _ = _near_bwd_tile(q, do, K, V, start, rows, ok, hi, bandwidth, right,
                                     BLOCK_N, D, DOT_PREC)
        m_new = tl.maximum(m, tl.max(raw, 1))
        alpha = tl.exp2((m - m_new) * qk_scale)
        p = tl.exp2((raw - m_new[:, None]) * qk_scale)
        psum = psum * alpha + tl.sum(p, 1)
        dnear = dnear * alpha + tl.sum(p * dov, 1)
        m = m_new
    scale = 1.0 / tl.where(psum > 0, psum, 1.0)  # rows past N meet no key
    dnear = dnear * scale
    for start in range(lo, hi, BLOCK_N):
        raw, dov, kb = _near_bwd_tile(q, do, K, V, start, rows, ok, hi, bandwidth, right,
                                      BLOCK_N, D, DOT_PREC)
        p = tl.exp2((raw - m[:, None]) * qk_scale) * scale[:, None]
        ds = p * (dov - dnear[:, None]) * (wn * sm_scale)
        dq = dot(ds.to(kb.dtype), kb, dq, DOT_PREC)
    return dq, dnear, m, scale


@triton.jit
def _near_bwd_kv(k, v, Q, DO, ROWMAX, PSCALE, DNEAR, n0, cols, ok, N, bandwidth, right,
                 qk_scale, sm_scale, wn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 D: tl.constexpr, DOT_PREC: tl.constexpr):
    """The band's dk, dv of one key tile (fp32): the queries i with i - k <= j <= i + right,
    their P recomputed from the rows' score max and 1 / l, and dS from their dO . Near (all
    three from `_near_bwd_q`)."""
    offs_d = tl.arange(0, D)
    dk = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    lo = tl.maximum(n0 - right, 0)
    hi = tl.minimum(n0 + BLOCK_M + bandwidth, N)
    for start in range(lo, hi, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        rok = rows < hi
        # [BLOCK_N, D]
        qb = tl.load(Q + rows[:, None] * D + offs_d[None, :], mask=rok[:, None], other=0.0)
        dob = tl.load(DO + rows[:, None] * D + offs_d[None, :], mask=rok[:, None], other=0.0)
        m = tl.load(ROWMAX + rows, mask=rok, other=0.0)
        pscale = tl.load(PSCALE + rows, mask=rok, other=0.0)
        dnear = tl.load(DNEAR + rows, mask=rok, other=0.0)
        # [BLOCK_M (keys), BLOCK_N (queries)]
        rel = cols[:, None] - rows[None, :]
        keep = (rel >= -bandwidth) & (rel <= right) & rok[None, :] & ok[:, None]
        st = tl.where(keep, dot(k, tl.trans(qb), None, DOT_PREC), float("-inf"))
        pt = tl.exp2((st - m[None, :]) * qk_scale) * pscale[None, :]
        dv = dot(pt.to(dob.dtype), dob, dv, DOT_PREC)
        dpt = dot(v, tl.trans(dob), None, DOT_PREC)
        dst = pt * (dpt - dnear[None, :]) * (wn * sm_scale)
        dk = dot(dst.to(qb.dtype), qb, dk, DOT_PREC)
    return dk, dv * wn  # dNear = w_near dO


@triton.jit
def _bwd_head(Q, K, V, DO, X, Y, ROWMAX, DNEAR, DEN, DDEN, WN, WF, bh, N, H,
              R: tl.constexpr, D: tl.constexpr):
    """A backward program's pointers moved to its (batch, head): the `[N, D]` tensors (X, Y are
    the kernel's own: Near and dq, or dk and dv), the per-row statistics and the per-map
    normalizers; and that head's blend weights."""
    off = bh * N * D
    wn = tl.load(WN + bh % H).to(tl.float32)
    wf = tl.load(WF + bh % H).to(tl.float32)
    return (Q + off, K + off, V + off, DO + off, X + off, Y + off, ROWMAX + bh * N,
            DNEAR + bh * N, DEN + bh * R * N, DDEN + bh * R * N, wn, wf)


@triton.jit
def _far_walk_head(Q, K, V, DO, X, Y, DEN, DDEN, WF, bh, N, H, D: tl.constexpr):
    """A causal far-field backward walk's pointers moved to its (batch, head): q, k, v, dO, its
    two `[N, D]` outputs X, Y, the map's per-row den and dL/d den (`[B*H, N]`); and w_far."""
    off = bh * N * D
    wf = tl.load(WF + bh % H).to(tl.float32)
    return (Q + off, K + off, V + off, DO + off, X + off, Y + off, DEN + bh * N, DDEN + bh * N,
            wf)


@triton.jit(do_not_specialize=["N"])
def _fmmformer_far_bwd_q_kernel(
    Q, K, V, DO, DQ, DFAR, DEN, DDEN, P, PZ, U, UZ, WF, N, H, rows_per_chunk, state_stride,
    n_states, eps,
    MAP: tl.constexpr, R: tl.constexpr, FIRST: tl.constexpr, LOWP: tl.constexpr,
    BLOCK_M: tl.constexpr, D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Causal backward map passes, query side of map MAP: dq += the gradient through
    w_far Far_MAP (FIRST: dq =). Program = (chunk, head), walking the chunk's tiles in order
    from the forward's kept prefix state (P, PZ: `[B*H, n_states, R, D, D]` fp32; a chunk is
    `state_stride` of the forward's) with one state in registers, as the forward's pass did.
    Per tile, with A the masked phi(q) phi(k)^T, Y = dO V^T and G = dO S^T:
    den = phi(q) . z + rowsum(A), dO . Far = (phi(q) . G + rowsum(A * Y)) / den (num is never
    formed), dden = -w_far (dO . Far) / den, and
    dphi(q) = (w_far / den) G + dden z + (masked (w_far / den) Y + dden) phi(k).
    Stores den and dden per row (DEN, DDEN `[B*H, N]`, for the key side), adds dO . Far_MAP
    to DFAR (`[B*H, N]`: the band's softmax delta and dL/dw_far take the sum over maps), and
    stores the chunk's dual sums U = sum_i (w_far / den_i) phi(q_i) dO_i^T,
    u = sum_i dden_i phi(q_i) (U, UZ: `[B*H, chunks, 1, D, D]`, `[B*H, chunks, 1, D]`)."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    n_chunks = tl.num_programs(0)
    Q, K, V, DO, DQ, _, DEN, DDEN, wf = _far_walk_head(Q, K, V, DO, DQ, DQ, DEN, DDEN, WF,
                                                      bh, N, H, D)
    DFAR += bh * N
    # [D, D], [D] fp32: the keys before the tile; the chunk's dual sums
    s, z = load_state(P, PZ, bh, c * state_stride, n_states, 0, MAP, R, D, D)
    u = tl.zeros([D, D], dtype=tl.float32)
    uz = tl.zeros([D], dtype=tl.float32)
    row_lo = c * rows_per_chunk
    row_hi = tl.minimum(row_lo + rows_per_chunk, N)
    for m0 in range(row_lo, row_hi, BLOCK_M):
        # [BLOCK_M, D]
        rows, ok, tile, q, k, v = qkv_tile(Q, K, V, m0, N, BLOCK_M, D)
        do = tl.load(DO + tile, mask=ok[:, None], other=0.0)
        do_m = mm(do, q, LOWP)
        fq, dphi = phi_one_grad(q, MAP)
        fq = tl.where(ok[:, None], fq, 0.0)
        fk = tl.where(ok[:, None], phi_one(k, MAP), 0.0)
        fk_m = mm(fk, q, LOWP)
        earlier = rows[None, :] <= rows[:, None]
        # [BLOCK_M, BLOCK_M]
        a = tl.where(earlier, dot(mm(fq, q, LOWP), tl.trans(fk_m), None, DOT_PREC), 0.0)
        y = dot(do, tl.trans(v), None, DOT_PREC)
        # [BLOCK_M, D]
        g = dot(do_m, tl.trans(mm(s, q, LOWP)), None, DOT_PREC)
        den = tl.sum(fq * z[None, :], 1) + tl.sum(a, 1) + eps
        fdo = (tl.sum(fq * g, 1) + tl.sum(a * y, 1)) / den
        scale = wf / den
        dden = -scale * fdo
        t = tl.where(earlier, y * scale[:, None] + dden[:, None], 0.0)
        dfq = dot(mm(t, q, LOWP), fk_m, g * scale[:, None] + dden[:, None] * z[None, :],
                   DOT_PREC)
        dq = dfq * dphi
        if not FIRST:
            dq += tl.load(DQ + tile, mask=ok[:, None], other=0.0).to(tl.float32)
            fdo += tl.load(DFAR + rows, mask=ok, other=0.0)
        tl.store(DQ + tile, dq.to(DQ.dtype.element_ty), mask=ok[:, None])
        tl.store(DFAR + rows, fdo, mask=ok)
        tl.store(DEN + rows, den, mask=ok)
        tl.store(DDEN + rows, dden, mask=ok)
        # The weights scale phi(q), not dO (see `_state_add`).
        u = dot(tl.trans(mm(fq * scale[:, None], q, LOWP)), do_m, u, DOT_PREC)
        uz += tl.sum(fq * dden[:, None], 0)
        s = dot(tl.trans(fk_m), mm(v, q, LOWP), s, DOT_PREC)
        z += tl.sum(fk, 0)
    store_state(U, UZ, bh, c, n_chunks, u, uz, 0, 0, 1, D)


@triton.jit(do_not_specialize=["N"])
def _fmmformer_far_bwd_kv_kernel(
    Q, K, V, DO, DK, DV, DEN, DDEN, U, UZ, WF, N, H, rows_per_chunk,
    MAP: tl.constexpr, FIRST: tl.constexpr, LOWP: tl.constexpr,
    BLOCK_M: tl.constexpr, D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Causal backward map passes, key side of map MAP: dk, dv += the gradients through
    w_far Far_MAP (FIRST: =). Program = (chunk, head), walking the chunk's tiles last to first
    from the dual state of the queries after the chunk (U, UZ: suffix sums of the query side's
    chunk sums), with dnum_i = (w_far / den_i) dO_i: dphi(k_j) = U v_j + u + the tile's own
    queries i >= j, sum_i (dnum_i . v_j + dden_i) phi(q_i); dv_j = phi(k_j) U + sum_i
    (phi(k_j) . phi(q_i)) dnum_i. Each tile's queries then join the state."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    n_chunks = tl.num_programs(0)
    Q, K, V, DO, DK, DV, DEN, DDEN, wf = _far_walk_head(Q, K, V, DO, DK, DV, DEN, DDEN, WF,
                                                       bh, N, H, D)
    # [D, D], [D] fp32: the queries after the tile
    u, uz = load_state(U, UZ, bh, c, n_chunks, 0, 0, 1, D, D)
    row_lo = c * rows_per_chunk
    steps = tl.cdiv(tl.minimum(row_lo + rows_per_chunk, N) - row_lo, BLOCK_M)
    for it in range(0, steps):
        # [BLOCK_M, D]
        cols, ok, tile, q, k, v = qkv_tile(Q, K, V, row_lo + (steps - 1 - it) * BLOCK_M, N,
                                            BLOCK_M, D)
        do = tl.load(DO + tile, mask=ok[:, None], other=0.0)
        den = tl.load(DEN + cols, mask=ok, other=1.0)
        dden = tl.load(DDEN + cols, mask=ok, other=0.0)
        scale = wf / den
        fq = tl.where(ok[:, None], phi_one(q, MAP), 0.0)
        fq_m = mm(fq, k, LOWP)
        fk, dphi = phi_one_grad(k, MAP)
        fk_m = mm(tl.where(ok[:, None], fk, 0.0), k, LOWP)
        u_m = mm(u, k, LOWP)
        # [BLOCK_M keys j, BLOCK_M queries i]: i >= j
        later = cols[None, :] >= cols[:, None]
        yt = dot(v, tl.trans(do), None, DOT_PREC)
        t1 = tl.where(later, yt * scale[None, :] + dden[None, :], 0.0)
        dfk = dot(mm(t1, k, LOWP), fq_m, dot(mm(v, k, LOWP), tl.trans(u_m), None, DOT_PREC),
                   DOT_PREC)
        dk = (dfk + uz[None, :]) * dphi
        t2 = tl.where(later, dot(fk_m, tl.trans(fq_m), None, DOT_PREC), 0.0)
        dnum_m = mm(do.to(tl.float32) * scale[:, None], k, LOWP)
        dv = dot(mm(t2, k, LOWP), dnum_m, dot(fk_m, u_m, None, DOT_PREC), DOT_PREC)
        if not FIRST:
            dk += tl.load(DK + tile, mask=ok[:, None], other=0.0).to(tl.float32)
            dv += tl.load(DV + tile, mask=ok[:, None], other=0.0).to(tl.float32)
        tl.store(DK + tile, dk.to(DK.dtype.element_ty), mask=ok[:, None])
        tl.store(DV + tile, dv.to(DV.dtype.element_ty), mask=ok[:, None])
        u = dot(tl.trans(fq_m), dnum_m, u, DOT_PREC)
        uz += tl.sum(fq * dden[:, None], 0)


@triton.jit(do_not_specialize=["N", "bandwidth"])
def _fmmformer_band_bwd_q_kernel(
    Q, K, V, DO, ROWMAX, PSCALE, DNEAR, DFAR, DQ, DW, WN, WF, N, H, bandwidth, qk_scale,
    sm_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Causal backward map passes, after the far-field maps': the band's share added to dq,
    one query tile per program. Stores the rows' band statistics for the key side (ROWMAX,
    PSCALE, DNEAR: score max, 1 / l and dO . Near; see `_near_bwd_q`), and per-program
    partial sums of dL/dw_near and dL/dw_far (DW `[2, B*H, programs]`; the far field's from
    DFAR, the maps' sum of dO . Far_l)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    Q, K, V, DO, DQ, _, ROWMAX, DNEAR, DFAR, _, wn, _ = _bwd_head(
        Q, K, V, DO, DQ, DQ, ROWMAX, DNEAR, DFAR, DFAR, WN, WF, bh, N, H, 1, D)
    m0 = pid * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    ok = rows < N
    tile = rows[:, None] * D + tl.arange(0, D)[None, :]
    # [BLOCK_M, D]
    q = tl.load(Q + tile, mask=ok[:, None], other=0.0)
    do = tl.load(DO + tile, mask=ok[:, None], other=0.0)
    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    dq, dnear, m, pscale = _near_bwd_q(dq, q, do, K, V, m0, rows, ok, N, bandwidth, 0,
                                       qk_scale, sm_scale, wn, BLOCK_M, BLOCK_N, D, DOT_PREC)
    tl.store(ROWMAX + rows, m, mask=ok)
    tl.store(DNEAR + rows, dnear, mask=ok)
    tl.store(PSCALE + bh * N + rows, pscale, mask=ok)
    dfar = tl.load(DFAR + rows, mask=ok, other=0.0)
    dq += tl.load(DQ + tile, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(DQ + tile, dq.to(DQ.dtype.element_ty), mask=ok[:, None])
    part = bh * tl.num_programs(0) + pid
    tl.store(DW + part, tl.sum(dnear, 0))
    tl.store(DW + tl.num_programs(1) * tl.num_programs(0) + part, tl.sum(dfar, 0))


@triton.jit(do_not_specialize=["N", "bandwidth"])
def _fmmformer_band_bwd_kv_kernel(
    Q, K, V, DO, ROWMAX, PSCALE, DNEAR, DK, DV, WN, N, H, bandwidth, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Causal backward map passes, last: the band's dk, dv added to the far field's, one key
    tile per program."""
    n0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    Q, K, V, DO, DK, DV, ROWMAX, DNEAR, _, _, wn, _ = _bwd_head(
        Q, K, V, DO, DK, DV, ROWMAX, DNEAR, DNEAR, DNEAR, WN, WN, bh, N, H, 1, D)
    cols = n0 + tl.arange(0, BLOCK_M)
    ok = cols < N
    tile = cols[:, None] * D + tl.arange(0, D)[None, :]
    # [BLOCK_M, D]
    k = tl.load(K + tile, mask=ok[:, None], other=0.0)
    v = tl.load(V + tile, mask=ok[:, None], other=0.0)
    dk, dv = _near_bwd_kv(k, v, Q, DO, ROWMAX, PSCALE + bh * N, DNEAR, n0, cols, ok, N,
                          bandwidth, 0, qk_scale, sm_scale, wn, BLOCK_M, BLOCK_N, D, DOT_PREC)
    dk += tl.load(DK + tile, mask=ok[:, None], other=0.0).to(tl.float32)
    dv += tl.load(DV + tile, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(DK + tile, dk.to(DK.dtype.element_ty), mask=ok[:, None])
    tl.store(DV + tile, dv.to(DV.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _fmmformer_bwd_dq_kernel(
    Q, K, V, DO, ROWMAX, PSCALE, DNEAR, DEN, DDEN, DQ, DW, P, PZ, WN, WF,
    N, H, bandwidth, rows_per_program, qk_scale, sm_scale, eps,
    R: tl.constexpr, LOWP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Non-causal dq (far field, then band), per-row far normalizers and their gradients, the
    softmax delta, and per-program partial sums of dL/dw_near and dL/dw_far, from the global
    states (P, PZ: `[B*H, 1, R, D, D]` in the matmul dtype, `[B*H, 1, R, D]` fp32).

    The band's softmax delta w_near dO . Near is summed from the band's P and dO V^T, its
    softmax recomputed from the band's scores alone (see `_near_bwd_q`; the rows' statistics
    stored in ROWMAX, PSCALE, DNEAR for the key side), as is dL/dw_near = dO . Near: the
    forward keeps no Near, and nothing is divided by w_near."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    Q, K, V, DO, DQ, _, ROWMAX, DNEAR, DEN, DDEN, wn, wf = _bwd_head(
        Q, K, V, DO, DQ, DQ, ROWMAX, DNEAR, DEN, DDEN, WN, WF, bh, N, H, R, D)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)

    dwn = tl.zeros([BLOCK_M], dtype=tl.float32)
    dwf = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_lo = pid * rows_per_program
    row_hi = tl.minimum(row_lo + rows_per_program, N)
    for m0 in range(row_lo, row_hi, BLOCK_M):
        rows = m0 + offs_m
        ok = rows < N
        tile = rows[:, None] * D + offs_d[None, :]
        # [BLOCK_M, D]
        q = tl.load(Q + tile, mask=ok[:, None], other=0.0)
        do = tl.load(DO + tile, mask=ok[:, None], other=0.0)
        dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        eq, rq = phi_prep(q)
        # [BLOCK_M]: sum_l dO . Far_l
        dfar = tl.zeros([BLOCK_M], dtype=tl.float32)
        for which in range(R):
            sp, zp = state_ptrs(P, PZ, bh, 0, 1, which, R, D)
            dq, dfar = _far_bwd_q(dq, dfar, q, eq, rq, do, wf, rows, N, sp, zp, eps, DEN, DDEN,
                                  which, LOWP, DOT_PREC)
        dwf += dfar
        dq, dnear, m, pscale = _near_bwd_q(dq, q, do, K, V, m0, rows, ok, N, bandwidth,
                                           bandwidth, qk_scale, sm_scale, wn, BLOCK_M,
                                           BLOCK_N, D, DOT_PREC)
        tl.store(ROWMAX + rows, m, mask=ok)
        tl.store(DNEAR + rows, dnear, mask=ok)
        tl.store(PSCALE + bh * N + rows, pscale, mask=ok)
        dwn += dnear
        tl.store(DQ + tile, dq.to(DQ.dtype.element_ty), mask=ok[:, None])
    # DW: [2, B*H, programs], dL/dw_near partials then dL/dw_far partials
    part = bh * tl.num_programs(0) + pid
    tl.store(DW + part, tl.sum(dwn, 0))
    tl.store(DW + tl.num_programs(1) * tl.num_programs(0) + part, tl.sum(dwf, 0))


@triton.jit
def _fmmformer_bwd_dkdv_kernel(
    Q, K, V, DO, ROWMAX, PSCALE, DNEAR, DEN, DDEN, DK, DV, U, UZ, WN, WF,
    N, H, bandwidth, rows_per_program, qk_scale, sm_scale,
    R: tl.constexpr, LOWP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Non-causal dk, dv: band (the queries whose window holds the key), then the far field
    from the global dual states (U, UZ, laid out as the dq kernel's P, PZ)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    Q, K, V, DO, DK, DV, ROWMAX, DNEAR, DEN, DDEN, wn, _ = _bwd_head(
        Q, K, V, DO, DK, DV, ROWMAX, DNEAR, DEN, DDEN, WN, WF, bh, N, H, R, D)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)

    row_lo = pid * rows_per_program
    n_tiles = tl.cdiv(tl.minimum(row_lo + rows_per_program, N) - row_lo, BLOCK_M)
    for it in range(0, n_tiles):
        n0 = row_lo + (n_tiles - 1 - it) * BLOCK_M
        cols = n0 + offs_m
        ok = cols < N
        tile = cols[:, None] * D + offs_d[None, :]
        # [BLOCK_M, D]
        k = tl.load(K + tile, mask=ok[:, None], other=0.0)
        v = tl.load(V + tile, mask=ok[:, None], other=0.0)
        dk, dv = _near_bwd_kv(k, v, Q, DO, ROWMAX, PSCALE + bh * N, DNEAR, n0, cols, ok, N,
                              bandwidth, bandwidth,
                              qk_scale, sm_scale, wn, BLOCK_M, BLOCK_N, D, DOT_PREC)

        ek, rk = phi_prep(k)
        for which in range(R):
            up, uzp = state_ptrs(U, UZ, bh, 0, 1, which, R, D)
            dk, dv = _far_bwd_kv(dk, dv, k, ek, rk, v, up, uzp, which, LOWP, DOT_PREC)
        tl.store(DK + tile, dk.to(DK.dtype.element_ty), mask=ok[:, None])
        tl.store(DV + tile, dv.to(DV.dtype.element_ty), mask=ok[:, None])


def walk_stride(n_states: int, bh: int, cfg: FMMConfig) -> int:
    """Forward chunks per causal backward walk. The walks fit `bwd_programs_per_sm` programs
    per SM: consecutive chunks are grouped so that the walks make at most one wave. A group
    starts from its first chunk's state."""
    return triton.cdiv(n_states * bh, cfg.bwd_programs_per_sm * cfg.sm_count)


def _causal_bwd_map_passes(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, saved: Saved, do: torch.Tensor,
    wn: torch.Tensor, wf: torch.Tensor, bandwidth: int, r: int, eps: float,
    cfg: FMMConfig,
) -> tuple[torch.Tensor, ...]:
    """Causal backward in passes, as the forward's: per far-field map a query-side walk
    (dq, den, dL/d den, dO . Far_l and the chunks' dual sums), a suffix scan of those sums,
    and a key-side walk (dk, dv), each over the forward's chunks with one state in registers;
    then the band's dq (with its softmax delta, from the band alone) and dk, dv, added.
    Gradients are accumulated in their own dtype (bf16: rounded four times)."""
    b, h, n, d = q.shape
    bh, dev = b * h, q.device
    low, prec = lowp(q.dtype), dot_prec(q.dtype)
    stride = walk_stride(saved.states.shape[1], bh, cfg)
    chunks = triton.cdiv(saved.states.shape[1], stride)
    rows = saved.chunk_rows * stride
    dq, dk, dv = (empty(q.shape, q.dtype, dev) for _ in range(3))
    # The band's row statistics (`_near_bwd_q`): score max, 1 / l and dO . Near.
    den, dden, dfar, row_max, p_scale, dnear = (
        empty((bh, n), torch.float32, dev) for _ in range(6))
    u = empty((bh, chunks, 1, d, d), torch.float32, dev)
    uz = empty((bh, chunks, 1, d), torch.float32, dev)
    cfg_q, cfg_k = cfg.far_bwd_q, cfg.far_bwd_kv
    for m in range(r):
        _fmmformer_far_bwd_q_kernel[(chunks, bh)](
            q, k, v, do, dq, dfar, den, dden, saved.states, saved.states_z, u, uz, wf,
            n, h, rows, stride, saved.states.shape[1], eps,
            MAP=m, R=r, FIRST=m == 0, LOWP=low, BLOCK_M=cfg_q.block_m, D=d, DOT_PREC=prec,
            **cfg_q.launch(),
        )
        scan(u, uz, reverse=True)  # in place: the chunks after each chunk
        _fmmformer_far_bwd_kv_kernel[(chunks, bh)](
            q, k, v, do, dk, dv, den, dden, u, uz, wf, n, h, rows,
            MAP=m, FIRST=m == 0, LOWP=low, BLOCK_M=cfg_k.block_m, D=d, DOT_PREC=prec,
            **cfg_k.launch(),
        )
    qk_scale, sm_scale = d**-0.5 * LOG2E, d**-0.5
    band_q, band_kv = cfg.band_bwd_q, cfg.band_bwd_kv
    tiles = triton.cdiv(n, band_q.block_m)
    # Per-program partial sums of dL/dw_near and dL/dw_far, reduced below in one launch.
    dw = empty((2, bh, tiles), torch.float32, dev)
    _fmmformer_band_bwd_q_kernel[(tiles, bh)](
        q, k, v, do, row_max, p_scale, dnear, dfar, dq, dw, wn, wf,
        n, h, bandwidth, qk_scale, sm_scale,
        BLOCK_M=band_q.block_m, BLOCK_N=band_q.block_n, D=d, DOT_PREC=prec, **band_q.launch(),
    )
    _fmmformer_band_bwd_kv_kernel[(triton.cdiv(n, band_kv.block_m), bh)](
        q, k, v, do, row_max, p_scale, dnear, dk, dv, wn, n, h, bandwidth, qk_scale, sm_scale,
        BLOCK_M=band_kv.block_m, BLOCK_N=band_kv.block_n, D=d, DOT_PREC=prec,
        **band_kv.launch(),
    )
    dwn, dwf = dw.view(2, b, h, -1).sum((1, 3))
    return dq, dk, dv, dwn, dwf


def fmmformer_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    saved: Saved,
    do: torch.Tensor,
    w_near: torch.Tensor,
    w_far: torch.Tensor,
    bandwidth: int,
    kernels: int,
    causal: bool,
    eps: float = EPS,
    config: FMMConfig | None = None,
) -> tuple[torch.Tensor, ...]:
    """Fused FMMformer backward from `fmmformer_fwd(..., save=True)` (`config` as there).

    Returns `dq, dk, dv` (like q) and `dw_near, dw_far` (`[H]`, fp32)."""
    b, h, n, d = q.shape
    dev, r, bh = q.device, kernels, b * h
    bandwidth = band_limit(n, bandwidth)
    cfg = config or fmm_config(d, dev)
    do = do.contiguous()
    wn = w_near.detach().to(torch.float32).contiguous()
    wf = w_far.detach().to(torch.float32).contiguous()
    if causal:
        return _causal_bwd_map_passes(q, k, v, saved, do, wn, wf, bandwidth, r, eps, cfg)
    low, prec = lowp(q.dtype), dot_prec(q.dtype)
    cfg_q, cfg_k = cfg.bwd_dq, cfg.bwd_dkdv
    qk_scale, sm_scale = d**-0.5 * LOG2E, d**-0.5
    dq = empty(q.shape, q.dtype, dev)
    dk = empty(k.shape, k.dtype, dev)
    dv = empty(v.shape, v.dtype, dev)
    rows_q = cfg_q.block_m * cfg_q.tiles_per_program
    rows_k = cfg_k.block_m * cfg_k.tiles_per_program

    # The band's row statistics, from the dq kernel: score max, 1 / l and dO . Near.
    row_max, p_scale, dnear = (empty((bh, n), torch.float32, dev) for _ in range(3))
    den = empty((bh, r, n), torch.float32, dev)
    dden = empty((bh, r, n), torch.float32, dev)
    grid_q = (triton.cdiv(n, rows_q), bh)
    # Per-program partial sums of dL/dw_near and dL/dw_far, reduced below in one launch.
    dw = empty((2, bh, grid_q[0]), torch.float32, dev)
    _fmmformer_bwd_dq_kernel[grid_q](
        q, k, v, do, row_max, p_scale, dnear, den, dden, dq, dw, saved.states,
        saved.states_z, wn, wf, n, h, bandwidth, rows_q, qk_scale, sm_scale, eps,
        R=r, LOWP=low, BLOCK_M=cfg_q.block_m, BLOCK_N=cfg_q.block_n, D=d,
        DOT_PREC=prec, **cfg_q.launch(),
    )

    # Dual states: U_l = sum_i phi_l(q_i) (w_far dO_i / den_i)^T, u_l = sum_i phi_l(q_i) dden_i.
    # Their chunk partials live in dk, written only afterwards (as the forward's in o): as
    # many chunks as keep the GPU busy, at no extra memory, whatever N.
    rows = state_chunk_rows(n, bh, r, d, dk.numel() * dk.element_size(), cfg)
    u, uz = state_pass(q, do, r, False, rows, cfg, weights=(den, dden, wf), scratch=dk)
    grid_k = (triton.cdiv(n, rows_k), bh)
    _fmmformer_bwd_dkdv_kernel[grid_k](
        q, k, v, do, row_max, p_scale, dnear, den, dden, dk, dv, u, uz, wn, wf,
        n, h, bandwidth, rows_k, qk_scale, sm_scale,
        R=r, LOWP=low, BLOCK_M=cfg_k.block_m, BLOCK_N=cfg_k.block_n, D=d,
        DOT_PREC=prec, **cfg_k.launch(),
    )
    dwn, dwf = dw.view(2, b, h, -1).sum((1, 3))
    return dq, dk, dv, dwn, dwf
