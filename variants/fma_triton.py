"""Fast Multipole Attention in Triton: forward and backward (SPEC 1.5; conventions: `variants.fma`).

All queries of a finest block share every level's interaction list, so a query tile is a dense
attention over its near keys (blocks b-1..b+1) plus a short list of coarse tokens (3 p_l per
level). Three phases:
1. Summaries (avgpool), one pass over K and V: `_fma_pool_kernel` reads contiguous token tiles
   of a chunk of level-1 windows and reduces them with 0/1 pooling matmuls, for every level
   whose windows fit in the chunk; `_fma_levels_kernel` builds the few wider levels from the one
   below. Both write the means of the real tokens into one levels-concatenated buffer. Learned
   conv summaries come from PyTorch instead (autograd handles the conv).
2. `_fma_fwd_kernel`: flash-style online softmax per query tile over the near key tiles, then over
   the tile's coarse tokens gathered through a host-built table (row index, log rho, and a bit per
   finest block of the tile saying which blocks use the token). `log rho` is added to the logits;
   zero-key slots (`zero_pad`) enter as one extra slot of logit `log(sum of their rho)`.
3. Backward (FlashAttention-2 style, recomputing P from the saved logsumexp): `_fma_bwd_dq_kernel`
   per query tile computes delta, dQ and the coarse-token gradients (P^T dO and dS^T Q, added with
   fp32 atomics since many tiles share a coarse token); `_fma_pushdown_kernel` folds the coarse
   gradients of all levels down to level-1 windows (the avgpool adjoint, divided by the counts);
   `_fma_bwd_dkdv_kernel` per key tile computes the near-field dK, dV and adds the folded coarse
   gradient of its window.
Nothing N x N exists: memory is O(N D) plus O(N D / s_1) for the summaries.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from harness.registry import Shape, register_variant, triton_devices
from variants.fma import (
    FMA_CHOICES,
    FMA_PARAMS,
    FMA_SHORT,
    FMAAttention,
    FMAGeometry,
    Summaries,
    check_fma,
    fma_flops,
    fma_geometry,
    fma_min_bytes,
    level_slots,
)

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCKS = (16, 32, 64, 128, 256)  # supported m: tl.dot needs tiles of >= 16 rows
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The interpreter multiplies bf16 dot operands as raw uint16 bits (triton-lang/triton#11584);
# there they go to fp32 first, which is what the tensor cores compute from bf16 anyway.
_UPCAST_DOTS = tl.constexpr(_INTERPRET)
_LOG2E = tl.constexpr(LOG2E)  # kernels may only read constexpr globals
_LN2 = tl.constexpr(LN2)


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes. `block_m` may be below m (tiles inside a block) or a multiple of it; the key
    tiles divide m. Defaults from H100 sweeps (bf16, D=64, m=64, N=65536, ms non-causal /
    causal; the forward's in `launch_config`): query tile 128 (2 blocks) 0.536 / 0.525 for the
    attention kernel, 32: 0.816 / 0.566; 8 warps 1.5-2x slower everywhere. Backward stages and
    register caps: `launch_config`."""

    block_m: int = 64  # query tile of the forward and dQ kernels (the tables' granularity)
    fwd_block_n: int = 64  # near key tile of the forward
    bwd_block_n: int = 64  # near key tile of dQ, key tile of dK/dV
    dkdv_m: int = 64  # query tile of the dK/dV kernel
    num_warps: int = 4
    fwd_stages: int = 2
    bwd_stages: int = 3
    fwd_maxnreg: int | None = None  # register cap of the forward kernel (more programs per SM)
    dq_maxnreg: int | None = None  # register caps of the dQ and dK/dV kernels
    dkdv_maxnreg: int | None = None

    def fwd_launch(self) -> dict:
        """The forward attention kernel's stages and register cap (warps: `_common`)."""
        opts = {"num_stages": self.fwd_stages}
        if self.fwd_maxnreg is not None:
            opts["maxnreg"] = self.fwd_maxnreg
        return opts

    def bwd_launch(self, kernel: str) -> dict:
        """Stages and register cap of the backward's `dq` or `dkdv` kernel."""
        cap = self.dq_maxnreg if kernel == "dq" else self.dkdv_maxnreg
        return {"num_stages": self.bwd_stages, **({"maxnreg": cap} if cap is not None else {})}


# Coarse-token tile width per causal flag (a power of two >= 16).
COARSE_TILE = {False: 64, True: 32}
# Pooling kernel: level-1 windows per program, token rows per loaded tile (halved for D > 64)
# and launch options (benchmarks may edit).
# H100 (bf16, D=64, N=65536, `scripts/fma_probe.py`, do_bench): 0.119 ms, 2.3 TB/s (0.105 ms
# kernel time); 8 warps 0.125; 32 or 64 windows 0.129 / 0.187 ms (the pooling matrix has a row
# per window of every level in the chunk: 2 * windows rows).
POOL_CONFIG = {"windows": 16, "block_t": 128, "num_warps": 4, "num_stages": 3}


def launch_config(
    m: int, causal: bool, block_m: int | None = None, head_dim: int = 64
) -> LaunchConfig:
    """Default tiles for finest block m: one block (at most 64 rows) per query tile.

    Forward at D <= 64 (H100 sweep, `scripts/fma_probe.py`, attention kernel alone, ms
    non-causal / causal): key tile 64, 2 / 1 stages, registers capped at 96 / 128 (0.298 /
    0.279; uncapped 0.343 / 0.301 at 194 / 145 registers, 2 / 3 programs per SM; a cap of 80
    spills to 1.56).

    Backward at D <= 64 (backward alone, ms non-causal / causal): 2 stages and the dQ and dK/dV
    kernels capped at 168 registers, 1.163 / 0.921 (3 stages uncapped 1.215 / 1.068: 255
    registers, 2 programs per SM; the caps fit 3; a cap of 128 spills more and is slower).
    Wider heads keep 3 stages uncapped (not measured)."""
    if _INTERPRET:
        t = min(m, 32)
        return LaunchConfig(block_m or t, t, t, t, 4, 1, 1)
    small = head_dim <= 64
    cap = (128 if causal else 96) if small else None
    bwd_cap = 168 if small else None
    return LaunchConfig(
        block_m or min(m, 64), min(m, 64), min(m, 64), 64, 4, 1 if causal else 2,
        2 if small else 3, cap, bwd_cap, bwd_cap,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    if _UPCAST_DOTS:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit(do_not_specialize=["N"])
def _fma_pool_kernel(
    k_ptr, v_ptr, sk_ptr, sv_ptr, ck_ptr, cv_ptr, off_ptr, win_ptr, table_ptr, N, N_PAD,
    TOTAL_ROWS, SEED_LEVEL, CHUNK: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr, PRECISION: tl.constexpr,
):
    """One chunk of CHUNK tokens per program. Every level whose windows fit in the chunk is a
    row set of one 0/1 pooling matrix (`_pool_table`: row r sums chunk tokens [lo_r, hi_r) of
    level lvl_r), so a single matmul per token tile accumulates the exact fp32 sums of all
    those levels at once (tokens past N read as zero). They are written as means of the real
    tokens; the fp32 sums of level SEED_LEVEL seed `_fma_levels_kernel` for the levels above."""
    chunk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    k_ptr += bh * N * HEAD_DIM
    v_ptr += bh * N * HEAD_DIM
    base = bh * TOTAL_ROWS * HEAD_DIM
    sk_ptr += base
    sv_ptr += base
    ck_ptr += base
    cv_ptr += base
    offs_t = tl.arange(0, BLOCK_T)
    offs_r = tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    # [ROWS]: level (-1: padding row) and token range of each pooled row in the chunk
    lvl = tl.load(table_ptr + offs_r)
    lo = tl.load(table_ptr + ROWS + offs_r)
    hi = tl.load(table_ptr + 2 * ROWS + offs_r)
    # [ROWS, HEAD_DIM]
    acc_k = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    acc_v = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    for t in range(0, CHUNK, BLOCK_T):
        tok = chunk * CHUNK + t + offs_t
        x_offs = tok[:, None] * HEAD_DIM + offs_d[None, :]
        # [BLOCK_T, HEAD_DIM]
        xk = tl.load(k_ptr + x_offs, mask=(tok < N)[:, None], other=0.0)
        xv = tl.load(v_ptr + x_offs, mask=(tok < N)[:, None], other=0.0)
        # [ROWS, BLOCK_T]: 1 where the token falls in row r's window (exact in bf16; via fp32:
        # the interpreter turns bool into bf16 as raw bits)
        pos = (t + offs_t)[None, :]
        pool = ((pos >= lo[:, None]) & (pos < hi[:, None])).to(tl.float32).to(xk.dtype)
        acc_k = _dot(pool, xk, acc_k, PRECISION)
        acc_v = _dot(pool, xv, acc_v, PRECISION)
    has = lvl >= 0
    off = tl.load(off_ptr + lvl, mask=has, other=0)
    win = tl.load(win_ptr + lvl, mask=has, other=1)
    row = (chunk * CHUNK + lo) // win  # the row's window among all of its level's
    ok = has & (row < N_PAD // win)
    dst = (off + row)[:, None] * HEAD_DIM + offs_d[None, :]
    count = tl.maximum(tl.minimum(N - row * win, win), 1).to(tl.float32)[:, None]
    tl.store(ck_ptr + dst, (acc_k / count).to(ck_ptr.dtype.element_ty), mask=ok[:, None])
    tl.store(cv_ptr + dst, (acc_v / count).to(cv_ptr.dtype.element_ty), mask=ok[:, None])
    seed = (ok & (lvl == SEED_LEVEL))[:, None]
    tl.store(sk_ptr + dst, acc_k, mask=seed)
    tl.store(sv_ptr + dst, acc_v, mask=seed)


@triton.jit(do_not_specialize=["N"])
def _fma_levels_kernel(
    sk_ptr, sv_ptr, ck_ptr, cv_ptr, off_ptr, win_ptr, N, START, LEVELS, TOTAL_ROWS, TOP_WIN,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Levels START.. (0-based) whose windows exceed a pooling chunk. One program per top-level
    window (and head): each level's sums from the one below (a window is one or two windows of
    the level below), and the means of the real tokens in the input dtype. Levels depend on each
    other only inside the program."""
    sub = tl.program_id(0)
    base = tl.program_id(1).to(tl.int64) * TOTAL_ROWS * HEAD_DIM
    sk_ptr += base
    sv_ptr += base
    ck_ptr += base
    cv_ptr += base
    offs_d = tl.arange(0, HEAD_DIM)[None, :]
    prev_off = tl.load(off_ptr + START - 1)  # sums seeded by _fma_pool_kernel
    prev_win = tl.load(win_ptr + START - 1)
    for lvl in range(START, LEVELS):
        off = tl.load(off_ptr + lvl)
        win = tl.load(win_ptr + lvl)
        ratio = win // prev_win  # 1 or 2
        n_rows = TOP_WIN // win
        for r0 in range(0, n_rows, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            row = sub * n_rows + rr
            ok = (rr < n_rows)[:, None]
            src = (prev_off + row * ratio)[:, None] * HEAD_DIM + offs_d
            pair = ((rr < n_rows) & (rr * 0 + ratio == 2))[:, None]  # a vector mask, not a scalar
            dst = (off + row)[:, None] * HEAD_DIM + offs_d
            # [BLOCK_R, HEAD_DIM]
            sum_k = tl.load(sk_ptr + src, mask=ok, other=0.0)
            sum_k += tl.load(sk_ptr + src + HEAD_DIM, mask=pair, other=0.0)
            sum_v = tl.load(sv_ptr + src, mask=ok, other=0.0)
            sum_v += tl.load(sv_ptr + src + HEAD_DIM, mask=pair, other=0.0)
            tl.store(sk_ptr + dst, sum_k, mask=ok)
            tl.store(sv_ptr + dst, sum_v, mask=ok)
            count = tl.maximum(tl.minimum(N - row * win, win), 1).to(tl.float32)[:, None]
            tl.store(ck_ptr + dst, (sum_k / count).to(ck_ptr.dtype.element_ty), mask=ok)
            tl.store(cv_ptr + dst, (sum_v / count).to(cv_ptr.dtype.element_ty), mask=ok)
        # The next level reads what other threads of this program just wrote.
        tl.debug_barrier()
        prev_off = off
        prev_win = win


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
    acc = _dot(p.to(vt.dtype), vt, acc * alpha[:, None], PRECISION)
    return acc, m_new, l_i


@triton.jit
def _near_range(m0, N, M: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
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
def _near_mask(offs_m, offs_n, hi, M: tl.constexpr, QB: tl.constexpr, CAUSAL: tl.constexpr):
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
        s = _dot(q, tl.trans(kt), None, PRECISION) * qk_scale
        if MASK:
            s = tl.where(_near_mask(offs_m, offs_n, hi, M, QB, CAUSAL), s, float("-inf"))
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, vt, PRECISION)
    return acc, m_i, l_i


@triton.jit
def _coarse_tile(idx_ptr, logw_ptr, bits_ptr, ck_ptr, cv_ptr, tab_ptr, c0,
                 HEAD_DIM: tl.constexpr, BLOCK_C: tl.constexpr):
    """Slots [c0, c0 + BLOCK_C) of a tile's coarse table (past the used prefix: row -1, log rho
    -inf): coarse row, log2 rho, the bits of the finest blocks using it, the offsets of its
    `[BLOCK_C, HEAD_DIM]` summaries and the summaries."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    idx = tl.load(idx_ptr + tab_ptr + offs_c)
    logw = tl.load(logw_ptr + tab_ptr + offs_c) * _LOG2E
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
    s = _dot(q, tl.trans(ckt), None, PRECISION) * qk_scale + logw[None, :]
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
    m_i = tl.load(zlog_ptr + offs_m // M, mask=row_ok, other=float("-inf")) * _LOG2E
    l_i = tl.where(m_i > float("-inf"), 1.0, 0.0)
    # [BLOCK_M, HEAD_DIM]
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # The tile's coarse tokens: only the table's used prefix is walked (causal tiles use from
    # 2 to 4 tokens per level). Causal: the first coarse tile is gathered before the near
    # field, whose work hides the latency of its two dependent loads (table row, then
    # summaries); H100 attention kernel 0.275 -> 0.257 ms. Non-causal tiles hold three near
    # tiles in flight already, and the extra registers made them slower (0.297 -> 0.356 ms).
    tab_ptr = (m0 // SB) * N_SLOTS
    used = tl.load(used_ptr + m0 // SB)
    if CAUSAL:
        idx, logw, bits, _, ckt, cvt = _coarse_tile(idx_ptr, logw_ptr, bits_ptr, ck_ptr, cv_ptr,
                                                    tab_ptr, 0, HEAD_DIM, BLOCK_C)
    lo, hi = _near_range(m0, N, M, BLOCK_M, CAUSAL)
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
        idx, logw, bits, _, ckt, cvt = _coarse_tile(idx_ptr, logw_ptr, bits_ptr, ck_ptr, cv_ptr,
                                                    tab_ptr, c0, HEAD_DIM, BLOCK_C)
        acc, m_i, l_i = _coarse_step(acc, m_i, l_i, q, idx, logw, bits, ckt, cvt, local,
                                     qk_scale, PRECISION, QB)

    l_i = tl.where(l_i > 0.0, l_i, 1.0)  # rows past N only; never stored
    tl.store(o_ptr + qo_offs, (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + offs_m, (m_i + tl.math.log2(l_i)) * _LN2, mask=row_ok)


@triton.jit
def _bwd_head(q_ptr, k_ptr, v_ptr, do_ptr, x_ptr, y_ptr, lse_ptr, delta_ptr, bh, N,
              HEAD_DIM: tl.constexpr):
    """A backward program's pointers moved to head `bh`: q, k, v, dO, the kernel's own two
    `[N, HEAD_DIM]` tensors x, y, and the per-row lse and delta."""
    head = bh * N * HEAD_DIM
    return (q_ptr + head, k_ptr + head, v_ptr + head, do_ptr + head, x_ptr + head,
            y_ptr + head, lse_ptr + bh * N, delta_ptr + bh * N)


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
    q_ptr, k_ptr, v_ptr, do_ptr, o_ptr, dq_ptr, lse_ptr, delta_ptr = _bwd_head(
        q_ptr, k_ptr, v_ptr, do_ptr, o_ptr, dq_ptr, lse_ptr, delta_ptr, bh, N, HEAD_DIM)
    ck_ptr += bh * TOTAL_ROWS * HEAD_DIM
    cv_ptr += bh * TOTAL_ROWS * HEAD_DIM
    dck_ptr += bh * TOTAL_ROWS * HEAD_DIM
    dcv_ptr += bh * TOTAL_ROWS * HEAD_DIM

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N
    qo_offs = offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    # [BLOCK_M, HEAD_DIM]
    q = tl.load(q_ptr + qo_offs, mask=row_ok[:, None], other=0.0)
    do = tl.load(do_ptr + qo_offs, mask=row_ok[:, None], other=0.0)
    o = tl.load(o_ptr + qo_offs, mask=row_ok[:, None], other=0.0)
    # [BLOCK_M]
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + offs_m, delta, mask=row_ok)
    lse2 = tl.load(lse_ptr + offs_m, mask=row_ok, other=0.0) * _LOG2E
    # [BLOCK_M, HEAD_DIM]
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    lo, hi = _near_range(m0, N, M, BLOCK_M, CAUSAL)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_offs = offs_n[:, None] * HEAD_DIM + offs_d[None, :]
        # [BLOCK_N, HEAD_DIM]
        kt = tl.load(k_ptr + kv_offs, mask=(offs_n < hi)[:, None], other=0.0)
        vt = tl.load(v_ptr + kv_offs, mask=(offs_n < hi)[:, None], other=0.0)
        # [BLOCK_M, BLOCK_N]
        p = tl.math.exp2(_dot(q, tl.trans(kt), None, PRECISION) * qk_scale - lse2[:, None])
        keep = _near_mask(offs_m, offs_n, hi, M, QB, CAUSAL) & row_ok[:, None]
        p = tl.where(keep, p, 0.0)
        ds = p * (_dot(do, tl.trans(vt), None, PRECISION) - delta[:, None])
        dq = _dot(ds.to(kt.dtype), kt, dq, PRECISION)

    local = offs_m // M - (m0 // SB) * QB
    tab_ptr = (m0 // SB) * N_SLOTS
    used = tl.load(used_ptr + m0 // SB)
    for c0 in range(0, used, BLOCK_C):
        idx, logw, bits, c_offs, ckt, cvt = _coarse_tile(
            idx_ptr, logw_ptr, bits_ptr, ck_ptr, cv_ptr, tab_ptr, c0, HEAD_DIM, BLOCK_C)
        c_ok = (idx >= 0)[:, None]
        # [BLOCK_M, BLOCK_C]
        s = _dot(q, tl.trans(ckt), None, PRECISION) * qk_scale + logw[None, :]
        keep = (((bits[None, :] >> local[:, None]) & 1) != 0) & row_ok[:, None]
        p = tl.where(keep, tl.math.exp2(s - lse2[:, None]), 0.0)
        ds = p * (_dot(do, tl.trans(cvt), None, PRECISION) - delta[:, None])
        dq = _dot(ds.to(ckt.dtype), ckt, dq, PRECISION)
        # [BLOCK_C, HEAD_DIM]: this tile's share of the coarse tokens' gradients
        dcv = _dot(tl.trans(p).to(do.dtype), do, None, PRECISION)
        dck = _dot(tl.trans(ds).to(q.dtype), q, None, PRECISION) * sm_scale
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
    q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, lse_ptr, delta_ptr = _bwd_head(
        q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, lse_ptr, delta_ptr, bh, N, HEAD_DIM)

    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < N
    kv_offs = offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    # [BLOCK_N, HEAD_DIM]
    kt = tl.load(k_ptr + kv_offs, mask=col_ok[:, None], other=0.0)
    vt = tl.load(v_ptr + kv_offs, mask=col_ok[:, None], other=0.0)
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
        lse2 = tl.load(lse_ptr + offs_m, mask=m_ok, other=0.0) * _LOG2E
        delta = tl.load(delta_ptr + offs_m, mask=m_ok, other=0.0)
        # [BLOCK_N, BLOCK_M]
        pt = tl.math.exp2(_dot(kt, tl.trans(q), None, PRECISION) * qk_scale - lse2[None, :])
        keep = m_ok[None, :] & (offs_n >= 0)[:, None]
        if CAUSAL:
            keep = keep & (offs_m[None, :] >= offs_n[:, None])
        pt = tl.where(keep, pt, 0.0)
        dv = _dot(pt.to(do.dtype), do, dv, PRECISION)
        dst = pt * (_dot(vt, tl.trans(do), None, PRECISION) - delta[None, :])
        dk = _dot(dst.to(q.dtype), q, dk, PRECISION)
    dk = dk * sm_scale
    if POOL:  # the avgpool adjoint of every level, folded to this key's level-1 window
        g_offs = bh * ROWS1 * HEAD_DIM + (offs_n // WIN1)[:, None] * HEAD_DIM + offs_d[None, :]
        dk += tl.load(gk_ptr + g_offs, mask=col_ok[:, None], other=0.0)
        dv += tl.load(gv_ptr + g_offs, mask=col_ok[:, None], other=0.0)
    tl.store(dk_ptr + kv_offs, dk.to(dk_ptr.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv_ptr + kv_offs, dv.to(dv_ptr.dtype.element_ty), mask=col_ok[:, None])


# ---------------------------------------------------------------------------------------------
# Plans (host-side tables, cached per problem) and launch wrappers
# ---------------------------------------------------------------------------------------------
def _alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the kernels must fill (tests swap in NaN-filled allocation)."""
    return torch.empty(shape, dtype=dtype, device=device)


@dataclass(frozen=True)
class FMAPlan:
    """Everything about one (length, params, query tile) that does not depend on the data."""

    geo: FMAGeometry
    causal: bool
    qb: int  # finest blocks per query tile (1 when the tile is at most one block)
    n_slots: int  # table width, a multiple of block_c (at least one tile: always readable)
    block_c: int
    idx: torch.Tensor  # [n_tiles_sb, n_slots] int32 coarse row, -1 for none
    logw: torch.Tensor  # [n_tiles_sb, n_slots] fp32 log rho (-inf for none)
    bits: torch.Tensor  # [n_tiles_sb, n_slots] int32: which finest blocks of the tile use it
    used: torch.Tensor  # [n_tiles_sb] int32: slots in use (a prefix of the tile's row)
    zlog: torch.Tensor  # [blocks] fp32 log of the zero-key weight of each block (-inf: none)
    level_off: torch.Tensor  # [max(L, 1)] int32 first row of each level
    level_win: torch.Tensor  # [max(L, 1)] int32 tokens under one coarse token of each level


@functools.lru_cache(maxsize=64)
def fma_plan(
    n: int, m: int, p: int, causal: bool, scale_attn: bool, zero_pad: bool, block_m: int,
    device: str,
) -> FMAPlan:
    """Coarse-token tables of every query tile, merged over the finest blocks a tile spans."""
    geo = fma_geometry(n, m, p)
    qb = max(block_m // m, 1)
    blocks = geo.blocks
    # Zero-key weight per block: level-0 blocks outside the sequence (m keys of weight 1 each),
    # then each level's zero slots.
    zero_w = np.zeros(blocks)
    if zero_pad:
        b = np.arange(blocks)
        zero_w += m * ((b == 0).astype(int) + (0 if causal else (b == blocks - 1).astype(int)))
    ids, logws, owners = [], [], []
    for level in range(1, geo.levels + 1):
        slots = level_slots(geo, level, causal, scale_attn, zero_pad)
        rows, logw, zero = (t.numpy() for t in slots)
        zero_w += np.where(zero, np.exp(logw), 0.0).sum(1)
        blk, col = np.nonzero(rows >= 0)
        ids.append(rows[blk, col] + geo.offsets[level - 1])
        logws.append(logw[blk, col])
        owners.append(blk)
    zlog = np.where(zero_w > 0, np.log(np.maximum(zero_w, 1e-300)), -np.inf)

    n_sb = -(-blocks // qb)
    if ids:
        ids, logws, owners = np.concatenate(ids), np.concatenate(logws), np.concatenate(owners)
        # One entry per (tile, coarse row), with a bit for each finest block of the tile using it.
        key = (owners // qb) * geo.total_rows + ids
        uniq, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        bits = np.zeros(len(uniq), dtype=np.int64)
        np.bitwise_or.at(bits, inverse, 1 << (owners % qb))
        tile = uniq // geo.total_rows
        pos = np.arange(len(uniq)) - np.searchsorted(tile, tile)  # rank inside the tile
        width = int(pos.max()) + 1
    else:
        width = 0
    # Causal tables are ragged (24 of at most 36 slots used on average at N=2^16, m=64, p=2):
    # narrower coarse tiles let most tiles stop after one.
    block_c = min(COARSE_TILE[causal], max(16, triton.next_power_of_2(max(width, 1))))
    n_slots = max(-(-width // block_c), 1) * block_c
    idx_t = np.full((n_sb, n_slots), -1, dtype=np.int32)
    logw_t = np.full((n_sb, n_slots), -np.inf, dtype=np.float32)
    bits_t = np.zeros((n_sb, n_slots), dtype=np.int32)
    used_t = np.zeros(n_sb, dtype=np.int32)
    if width:
        idx_t[tile, pos] = uniq % geo.total_rows
        logw_t[tile, pos] = logws[first]
        bits_t[tile, pos] = bits
        np.maximum.at(used_t, tile, pos + 1)
    dev = torch.device(device)

    def to_dev(a, dtype):
        return torch.as_tensor(a, dtype=dtype, device=dev)

    return FMAPlan(
        geo, causal, qb, n_slots, block_c,
        to_dev(idx_t, torch.int32), to_dev(logw_t, torch.float32), to_dev(bits_t, torch.int32),
        to_dev(used_t, torch.int32), to_dev(zlog, torch.float32),
        to_dev(list(geo.offsets) or [0], torch.int32),
        to_dev(list(geo.windows) or [1], torch.int32),
    )  # fmt: skip


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: int) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        shapes = f"{q.shape}, {k.shape}, {v.shape}"
        raise ValueError(f"q, k, v must share one [B, H, N, D] shape; got {shapes}")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in DTYPES:
        dtypes = f"{q.dtype}, {k.dtype}, {v.dtype}"
        raise ValueError(f"q, k, v must share one dtype of {DTYPES}; got {dtypes}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head dim must be one of {HEAD_DIMS}, got {q.shape[-1]}")
    if m not in BLOCKS:
        raise ValueError(f"fma_triton needs m in {BLOCKS}, got {m}")


def _precision(q: torch.Tensor) -> str:
    # fp32 inputs get exact fp32 dots (no tf32): whoever asks for fp32 wants the accuracy.
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _common(q: torch.Tensor, plan: FMAPlan, cfg: LaunchConfig) -> dict:
    return dict(
        M=plan.geo.m, HEAD_DIM=q.shape[-1], CAUSAL=plan.causal, PRECISION=_precision(q),
        num_warps=cfg.num_warps,
    )  # fmt: skip


@functools.lru_cache(maxsize=64)
def _pool_table(windows: tuple[int, ...], chunk: int, device: str) -> tuple[torch.Tensor, int]:
    """The pooling kernel's rows for chunks of `chunk` tokens: `[3, rows]` int32 (level, or -1
    for padding; first and end token in the chunk) for every window of every level that fits
    in a chunk, and the number of such levels."""
    chunk_levels = sum(w <= chunk for w in windows)
    spans = [(lvl, s, s + w) for lvl, w in enumerate(windows[:chunk_levels])
             for s in range(0, chunk, w)]  # fmt: skip
    rows = triton.next_power_of_2(max(len(spans), 16))  # tl.dot needs >= 16 rows
    table = np.zeros((3, rows), dtype=np.int32)
    table[0] = -1
    table[:, : len(spans)] = np.array(spans, dtype=np.int32).T
    return torch.as_tensor(table, device=torch.device(device)), chunk_levels


def _pool(k: torch.Tensor, v: torch.Tensor, plan: FMAPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Avgpool summaries of every level, `[B, H, total_rows, D]` in the input dtype."""
    b, h, n, d = k.shape
    geo = plan.geo
    ck = _alloc((b, h, geo.total_rows, d), k.dtype, k.device)
    cv = _alloc((b, h, geo.total_rows, d), k.dtype, k.device)
    if geo.levels == 0:
        return ck, cv
    sums = _alloc((2, b, h, geo.total_rows, d), torch.float32, k.device)
    chunk = POOL_CONFIG["windows"] * geo.windows[0]
    table, chunk_levels = _pool_table(geo.windows, chunk, str(k.device))
    _fma_pool_kernel[(triton.cdiv(geo.n_pad, chunk), b * h)](
        k, v, sums[0], sums[1], ck, cv, plan.level_off, plan.level_win, table, n, geo.n_pad,
        geo.total_rows, chunk_levels - 1, CHUNK=chunk, ROWS=table.shape[1], HEAD_DIM=d,
        BLOCK_T=min(chunk, POOL_CONFIG["block_t"] // (1 if d <= 64 else 2)),
        PRECISION=_precision(k), num_warps=POOL_CONFIG["num_warps"],
        num_stages=POOL_CONFIG["num_stages"],
    )  # fmt: skip
    if chunk_levels < geo.levels:
        _fma_levels_kernel[(geo.rows[-1], b * h)](
            sums[0], sums[1], ck, cv, plan.level_off, plan.level_win, n, chunk_levels,
            geo.levels, geo.total_rows, geo.windows[-1], HEAD_DIM=d, BLOCK_R=64 if d <= 64 else 32,
        )  # fmt: skip
    return ck, cv


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
        config: tile sizes (default `launch_config(m, causal, head_dim=D)`).

    Returns:
        `(o, lse, ck, cv)`: `o` `[B, H, N, D]`, `lse` `[B, H, N]` fp32 (natural log of the
        weighted sum of exponentials over all slots), and the summaries used.
    """
    _check_inputs(q, k, v, m)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, h, n, d = q.shape
    cfg = config or launch_config(m, causal, head_dim=q.shape[-1])
    plan = fma_plan(n, m, p, causal, scale_attn, zero_pad, cfg.block_m, str(q.device))
    ck, cv = (t.contiguous() for t in coarse) if coarse is not None else _pool(k, v, plan)
    o = out[0] if out else _alloc(q.shape, q.dtype, q.device)
    lse = out[1] if out else _alloc(q.shape[:-1], torch.float32, q.device)
    _fma_fwd_kernel[(triton.cdiv(n, cfg.block_m), b * h)](
        q, k, v, ck, cv, plan.idx, plan.logw, plan.bits, plan.used, plan.zlog, o, lse,
        n, plan.geo.total_rows, plan.n_slots, d**-0.5 * LOG2E,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.fwd_block_n, BLOCK_C=plan.block_c, QB=plan.qb,
        SB=max(cfg.block_m, m), **_common(q, plan, cfg), **cfg.fwd_launch(),
    )  # fmt: skip
    return o, lse, ck, cv


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
    _check_inputs(q, k, v, m)
    q, k, v, o, lse = (t.contiguous() for t in (q, k, v, o, lse))
    do = do.to(q.dtype).contiguous()
    b, h, n, d = q.shape
    cfg = config or launch_config(m, causal, head_dim=q.shape[-1])
    plan = fma_plan(n, m, p, causal, scale_attn, zero_pad, cfg.block_m, str(q.device))
    geo = plan.geo
    dq, dk, dv = out if out else (_alloc(q.shape, q.dtype, q.device) for _ in range(3))
    delta = _alloc(lse.shape, torch.float32, q.device)
    dc = torch.zeros((2, b, h, geo.total_rows, d), dtype=torch.float32, device=q.device)
    common = _common(q, plan, cfg)
    qk_scale, sm_scale = d**-0.5 * LOG2E, d**-0.5
    # dQ first: it also writes delta and the coarse gradients, which the dK/dV kernel reads.
    _fma_bwd_dq_kernel[(triton.cdiv(n, cfg.block_m), b * h)](
        q, k, v, ck, cv, plan.idx, plan.logw, plan.bits, plan.used, o, do, lse, delta, dq,
        dc[0], dc[1],
        n, geo.total_rows, plan.n_slots, qk_scale, sm_scale,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.bwd_block_n, BLOCK_C=plan.block_c, QB=plan.qb,
        SB=max(cfg.block_m, m), **cfg.bwd_launch("dq"), **common,
    )  # fmt: skip
    pool = pool_adjoint and geo.levels > 0
    rows1, win1 = (geo.rows[0], geo.windows[0]) if geo.levels else (1, 1)
    g = _alloc((2, b, h, rows1, d), torch.float32, q.device) if pool else dc
    if pool:
        block_r = 64
        _fma_pushdown_kernel[(triton.cdiv(rows1, block_r), b * h)](
            dc[0], dc[1], g[0], g[1], plan.level_off, plan.level_win, n, geo.levels, rows1,
            geo.total_rows, win1, HEAD_DIM=d, BLOCK_R=block_r,
        )
    _fma_bwd_dkdv_kernel[(triton.cdiv(n, cfg.bwd_block_n), b * h)](
        q, k, v, do, lse, delta, g[0], g[1], dk, dv, n, rows1, win1, qk_scale, sm_scale,
        POOL=pool, BLOCK_M=cfg.dkdv_m, BLOCK_N=cfg.bwd_block_n, **cfg.bwd_launch("dkdv"),
        **common,
    )  # fmt: skip
    return dq, dk, dv, dc[0], dc[1]


# ---------------------------------------------------------------------------------------------
# Autograd and public function
# ---------------------------------------------------------------------------------------------
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
        config: tile sizes (default `launch_config(m, causal, head_dim=D)`).

    Returns:
        `o` `[B, H, N, D]` in the input dtype.
    """
    ck = cv = None
    if coarse is not None:
        ck = torch.cat([c for c, _ in coarse], dim=2).to(q.dtype) if coarse else q.new_zeros(0)
        cv = torch.cat([c for _, c in coarse], dim=2).to(q.dtype) if coarse else q.new_zeros(0)
    params = dict(m=m, p=p, causal=causal, scale_attn=scale_attn, zero_pad=zero_pad, config=config)
    return _FMATriton.apply(q, k, v, ck, cv, params)


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------
def check_fma_triton(shape: Shape, params: dict) -> str | None:
    if shape.head_dim not in HEAD_DIMS:
        return f"fma_triton needs head_dim in {HEAD_DIMS}, got {shape.head_dim}"
    if shape.dtype not in DTYPES:
        return f"fma_triton runs fp16/bf16/fp32, not {shape.dtype}"
    if params["m"] not in BLOCKS:
        return f"fma_triton needs m in {BLOCKS}, got {params['m']}"
    return check_fma(shape, params)


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
    return FMAAttention(
        shape.seq_len, shape.head_dim, m=m, p=p, causal=shape.causal, scale_attn=scale_attn,
        zero_pad=zero_pad, downsample=downsample, impl=fma_triton,
    )  # fmt: skip
