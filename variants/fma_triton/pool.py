"""FMA avgpool summaries in one pass over K and V: `_fma_pool_kernel` reduces contiguous token
tiles of a chunk of level-1 windows with 0/1 pooling matmuls, for every level whose windows fit
in the chunk; `_fma_levels_kernel` builds the few wider levels from the one below. Both write
the means of the real tokens into one levels-concatenated buffer."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from variants.fma_triton.configs import LaunchConfig, precision
from variants.fma_triton.plan import FMAPlan, pool_table
from variants.triton_common import dot, empty


@triton.jit(do_not_specialize=["N"])
def _fma_pool_kernel(
    k_ptr, v_ptr, sk_ptr, sv_ptr, ck_ptr, cv_ptr, off_ptr, win_ptr, table_ptr, N, N_PAD,
    TOTAL_ROWS, SEED_LEVEL, CHUNK: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr, PRECISION: tl.constexpr,
):
    """One chunk of CHUNK tokens per program. Every level whose windows fit in the chunk is a
    row set of one 0/1 pooling matrix (`pool_table`: row r sums chunk tokens [lo_r, hi_r) of
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
        acc_k = dot(pool, xk, acc_k, PRECISION)
        acc_v = dot(pool, xv, acc_v, PRECISION)
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


def pool(
    k: torch.Tensor, v: torch.Tensor, plan: FMAPlan, cfg: LaunchConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Avgpool summaries of every level, `[B, H, total_rows, D]` in the input dtype."""
    b, h, n, d = k.shape
    geo = plan.geo
    ck = empty((b, h, geo.total_rows, d), k.dtype, k.device)
    cv = empty((b, h, geo.total_rows, d), k.dtype, k.device)
    if geo.levels == 0:
        return ck, cv
    sums = empty((2, b, h, geo.total_rows, d), torch.float32, k.device)
    chunk = cfg.pool_windows * geo.windows[0]
    table, chunk_levels = pool_table(geo.windows, chunk, str(k.device))
    _fma_pool_kernel[(triton.cdiv(geo.n_pad, chunk), b * h)](
        k, v, sums[0], sums[1], ck, cv, plan.level_off, plan.level_win, table, n, geo.n_pad,
        geo.total_rows, chunk_levels - 1, CHUNK=chunk, ROWS=table.shape[1], HEAD_DIM=d,
        BLOCK_T=min(chunk, cfg.pool_block_t // (1 if d <= 64 else 2)),
        PRECISION=precision(k.dtype), num_warps=cfg.pool_warps, num_stages=cfg.pool_stages,
    )  # fmt: skip
    if chunk_levels < geo.levels:
        _fma_levels_kernel[(geo.rows[-1], b * h)](
            sums[0], sums[1], ck, cv, plan.level_off, plan.level_win, n, chunk_levels,
            geo.levels, geo.total_rows, geo.windows[-1], HEAD_DIM=d, BLOCK_R=64 if d <= 64 else 32,
        )  # fmt: skip
    return ck, cv
