"""FMMformer forward: the band (window_triton's online softmax), the far field and the blend
written to o once per query tile (non-causal), or, causal, a band pass followed by one pass per
far-field map over chunks that carry that map's prefix state."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from variants.fmmformer_triton.configs import FMMConfig, fmm_config
from variants.fmmformer_triton.states import (
    Saved,
    chunk_rows,
    dot_prec,
    load_state,
    load_states,
    lowp,
    mm,
    prefix_states,
    state_chunk_rows,
    state_pass,
)
from variants.linear import EPS
from variants.triton_common import (
    LOG2E,
    band_limit,
    check_qkv,
    dot,
    empty,
    exp_neg_abs,
    phi_map,
)
from variants.window_triton import query_tile_keys, window_fwd_inner


@triton.jit
def _near_fwd(q, K, V, m0, rows, ok, N, bandwidth, right, qk_scale, wn,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
              D: tl.constexpr, DOT_PREC: tl.constexpr):
    """w_near * Near for one query tile and BLOCK_V value columns (V starts at them):
    window_triton's online softmax over the key tiles that meet the band (masked edge tiles,
    unmasked interior). The backward recomputes the band's softmax from its own scores, so
    nothing of it is saved."""
    lo, mid_lo, mid_hi, hi = query_tile_keys(m0, N, bandwidth, right, BLOCK_M, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # [BLOCK_M, BLOCK_V]
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    acc, m_i, l_i = window_fwd_inner(acc, m_i, l_i, q, K, V, rows, lo, mid_lo, N, bandwidth,
                                      right, qk_scale, D, BLOCK_N, True, DOT_PREC)
    acc, m_i, l_i = window_fwd_inner(acc, m_i, l_i, q, K, V, rows, mid_lo, mid_hi, N,
                                      bandwidth, right, qk_scale, D, BLOCK_N, False, DOT_PREC)
    acc, m_i, l_i = window_fwd_inner(acc, m_i, l_i, q, K, V, rows, mid_hi, hi, N, bandwidth,
                                      right, qk_scale, D, BLOCK_N, True, DOT_PREC)
    return acc * (wn / l_i)[:, None]


@triton.jit
def _far_apply(out, q, eq, s, z, wf, eps, L: tl.constexpr,
               LOWP: tl.constexpr, DOT_PREC: tl.constexpr):
    """out += w_far Far_L for one query tile from the global state S_L (`[D, out columns]`,
    matmul dtype) and z_L (non-causal)."""
    fq = phi_map(q, eq, L)
    w = wf / (tl.sum(fq * z[None, :], 1) + eps)
    return dot(mm(fq * w[:, None], s, LOWP), s, out, DOT_PREC)


@triton.jit
def _fwd_head(Q, K, V, O, WN, WF, bh, v0, N, H, D: tl.constexpr):
    """A forward program's pointers moved to its (batch, head) and value columns from v0, and
    that head's blend weights."""
    off = bh * N * D
    wn = tl.load(WN + bh % H).to(tl.float32)
    wf = tl.load(WF + bh % H).to(tl.float32)
    return Q + off, K + off, V + off + v0, O + off + v0, wn, wf


@triton.jit
def qkv_tile(Q, K, V, m0, N, BLOCK_M: tl.constexpr, D: tl.constexpr):
    """Rows m0.. of one tile (`[BLOCK_M, D]` offsets and the in-range mask) and its q, k, v."""
    rows = m0 + tl.arange(0, BLOCK_M)
    ok = rows < N
    tile = rows[:, None] * D + tl.arange(0, D)[None, :]
    q = tl.load(Q + tile, mask=ok[:, None], other=0.0)
    k = tl.load(K + tile, mask=ok[:, None], other=0.0)
    v = tl.load(V + tile, mask=ok[:, None], other=0.0)
    return rows, ok, tile, q, k, v


@triton.jit(do_not_specialize=["N", "bandwidth"])
def _fmmformer_fwd_kernel(
    Q, K, V, O, P, PZ, WN, WF,
    N, H, bandwidth, qk_scale, eps,
    R: tl.constexpr, LOWP: tl.constexpr, TILES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Non-causal: each program walks TILES consecutive query tiles of one (batch, head) for
    BLOCK_V output columns (the column blocks of a tile are neighbouring programs); P, PZ hold
    the global states (`[B*H, 1, R, D, D]` in the matmul dtype, `[B*H, 1, R, D]` fp32)."""
    n_vb: tl.constexpr = D // BLOCK_V
    pid = tl.program_id(0) // n_vb
    v0 = (tl.program_id(0) % n_vb) * BLOCK_V
    bh = tl.program_id(1).to(tl.int64)
    Q, K, V, O, wn, wf = _fwd_head(Q, K, V, O, WN, WF, bh, v0, N, H, D)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_v = tl.arange(0, BLOCK_V)
    for t in range(TILES):
        m0 = (pid * TILES + t) * BLOCK_M
        rows = m0 + offs_m
        ok = rows < N
        # [BLOCK_M, D]
        q = tl.load(Q + rows[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0)
        tile = rows[:, None] * D + offs_v[None, :]
        out = _near_fwd(q, K, V, m0, rows, ok, N, bandwidth, bandwidth, qk_scale, wn,
                        BLOCK_M, BLOCK_N, BLOCK_V, D, DOT_PREC)
        eq = exp_neg_abs(q)
        # The far states are loaded (L2 hits) after the band: loaded before it, they held
        # registers through it (measured no faster, and slower under a register cap).
        s0, z0, s1, z1, s2, z2 = load_states(P, PZ, bh, 0, 1, v0, R, D, BLOCK_V)
        out = _far_apply(out, q, eq, s0, z0, wf, eps, 0, LOWP, DOT_PREC)
        if R > 1:
            out = _far_apply(out, q, eq, s1, z1, wf, eps, 1, LOWP, DOT_PREC)
        if R > 2:
            out = _far_apply(out, q, eq, s2, z2, wf, eps, 2, LOWP, DOT_PREC)
        tl.store(O + tile, out.to(O.dtype.element_ty), mask=ok[:, None])


@triton.jit(do_not_specialize=["N", "bandwidth"])
def _fmmformer_band_kernel(
    Q, K, V, O, WN, N, H, bandwidth, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Causal map passes, first pass: o = w_near * Near, one query tile per program."""
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    Q, K, V, O, wn, _ = _fwd_head(Q, K, V, O, WN, WN, bh, 0, N, H, D)
    rows = m0 + tl.arange(0, BLOCK_M)
    ok = rows < N
    tile = rows[:, None] * D + tl.arange(0, D)[None, :]
    q = tl.load(Q + tile, mask=ok[:, None], other=0.0)
    out = _near_fwd(q, K, V, m0, rows, ok, N, bandwidth, 0, qk_scale, wn,
                    BLOCK_M, BLOCK_N, D, D, DOT_PREC)
    tl.store(O + tile, out.to(O.dtype.element_ty), mask=ok[:, None])


@triton.jit(do_not_specialize=["N"])
def _fmmformer_far_causal_kernel(
    Q, K, V, O, P, PZ, WF, N, H, rows_per_chunk, eps,
    MAP: tl.constexpr, LOWP: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Causal map passes, one far-field map per pass: o += w_far Far_MAP. Program = (chunk,
    head), walking the chunk's tiles from its prefix state (P, PZ: `[B*H, chunks, 1, D, D]`
    fp32) with one state in registers: the masked intra-tile product and the carried state
    applied, normalized, added to o's tile."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    n_chunks = tl.num_programs(0)
    Q, K, V, O, _, wf = _fwd_head(Q, K, V, O, WF, WF, bh, 0, N, H, D)
    s, z = load_state(P, PZ, bh, c, n_chunks, 0, 0, 1, D, D)
    row_lo = c * rows_per_chunk
    row_hi = tl.minimum(row_lo + rows_per_chunk, N)
    for m0 in range(row_lo, row_hi, BLOCK_M):
        # [BLOCK_M, D]
        rows, ok, tile, q, k, v = qkv_tile(Q, K, V, m0, N, BLOCK_M, D)
        fq = phi_map(q, exp_neg_abs(q), MAP)
        fk = tl.where(ok[:, None], phi_map(k, exp_neg_abs(k), MAP), 0.0)
        fq_m = mm(fq, v, LOWP)
        fk_m = mm(fk, v, LOWP)
        v_m = mm(v, v, LOWP)
        # [BLOCK_M, BLOCK_M]
        a = tl.where(rows[None, :] <= rows[:, None],
                     dot(fq_m, tl.trans(fk_m), None, DOT_PREC), 0.0)
        den = tl.sum(fq * z[None, :], 1) + tl.sum(a, 1) + eps
        num = dot(mm(a, v, LOWP), v_m, dot(fq_m, mm(s, v, LOWP), None, DOT_PREC),
                   DOT_PREC)
        out = tl.load(O + tile, mask=ok[:, None], other=0.0).to(tl.float32)
        out += num * (wf / den)[:, None]
        tl.store(O + tile, out.to(O.dtype.element_ty), mask=ok[:, None])
        s = dot(tl.trans(fk_m), v_m, s, DOT_PREC)
        z += tl.sum(fk, 0)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w_near: torch.Tensor,
                 w_far: torch.Tensor, bandwidth: int, kernels: int) -> None:
    """Raise ValueError for what the kernels do not support."""
    check_qkv("fmmformer_triton", q, k, v)
    heads = q.shape[1]
    for name, w in (("w_near", w_near), ("w_far", w_far)):
        if tuple(w.shape) != (heads,):
            raise ValueError(f"{name} must have shape ({heads},), one weight per head, "
                             f"got {tuple(w.shape)}")
    if bandwidth < 0:
        raise ValueError(f"bandwidth must be >= 0, got {bandwidth}")
    if kernels not in (1, 2, 3):
        raise ValueError(f"kernels must be 1, 2 or 3, got {kernels}")


def _causal_map_passes(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
    wn: torch.Tensor, wf: torch.Tensor, bandwidth: int, r: int, eps: float, save: bool,
    cfg: FMMConfig,
) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """Causal forward into o: the band pass, then per far-field map its chunk prefix states
    (chunks for `far_programs_per_sm` programs per SM) and its pass adding w_far Far_l to o.
    Without `save` one map's states live at a time; with it every map's are kept for the
    backward and returned with their chunk rows."""
    b, h, n, d = q.shape
    bh, dev = b * h, q.device
    tiles = cfg.band_causal
    _fmmformer_band_kernel[(triton.cdiv(n, tiles.block_m), bh)](
        q, k, v, o, wn, n, h, bandwidth, d**-0.5 * LOG2E,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, D=d, DOT_PREC=dot_prec(q.dtype),
        **tiles.launch(),
    )
    tiles = cfg.far_causal if save else cfg.far_causal_inference
    # Rows a multiple of every causal tile (the backward walks these chunks when saved).
    block = cfg.tile_multiple("far_causal", "far_causal_inference", "far_bwd_q", "far_bwd_kv")
    o_bytes = q.numel() * q.element_size()
    budget = max(cfg.state_memory_fraction * o_bytes, cfg.state_memory_floor)
    per_sm = cfg.far_programs_per_sm if save else cfg.far_inference_programs_per_sm
    rows = chunk_rows(n, bh, 1, d, block, per_sm * cfg.sm_count, budget)
    chunks = triton.cdiv(n, rows)
    kept = None
    if save:
        kept = (empty((bh, chunks, r, d, d), torch.float32, dev),
                empty((bh, chunks, r, d), torch.float32, dev))
    for m in range(r):
        states, states_z = prefix_states(k, v, rows, cfg, map0=m)
        _fmmformer_far_causal_kernel[(chunks, bh)](
            q, k, v, o, states, states_z, wf, n, h, rows, eps,
            MAP=m, LOWP=lowp(q.dtype), BLOCK_M=tiles.block_m, D=d,
            DOT_PREC=dot_prec(q.dtype), **tiles.launch(),
        )
        if kept is not None:
            kept[0][:, :, m] = states[:, :, 0]
            kept[1][:, :, m] = states_z[:, :, 0]
        del states, states_z
    return (*kept, rows) if kept is not None else None


def fmmformer_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w_near: torch.Tensor,
    w_far: torch.Tensor,
    bandwidth: int,
    kernels: int,
    causal: bool,
    eps: float = EPS,
    save: bool = False,
    out: torch.Tensor | None = None,
    config: FMMConfig | None = None,
) -> tuple[torch.Tensor, Saved | None]:
    """Fused FMMformer forward.

    Args:
        q, k, v: `[B, H, N, D]`, contiguous, fp16/bf16/fp32, D in 16/32/64/128.
        w_near, w_far: `[H]` blend weights.
        bandwidth, kernels, causal, eps: as `fmmformer_reference`.
        save: also return what `fmmformer_bwd` needs (the far-field states).
        out: optional preallocated `[B, H, N, D]` output.
        config: launch config (default `fmm_config(D, q.device)`).
    Returns:
        `o` and the saved tensors (None unless `save`).
    """
    check_inputs(q, k, v, w_near, w_far, bandwidth, kernels)
    b, h, n, d = q.shape
    bandwidth = band_limit(n, bandwidth)
    dev, r, bh = q.device, kernels, b * h
    cfg = config or fmm_config(d, dev)
    wn = w_near.detach().to(torch.float32).contiguous()
    wf = w_far.detach().to(torch.float32).contiguous()

    o = out if out is not None else empty(q.shape, q.dtype, dev)
    if causal:
        kept = _causal_map_passes(q, k, v, o, wn, wf, bandwidth, r, eps, save, cfg)
        return o, (Saved(*kept) if save else None)
    # The chunk partials live in o, which the main kernel writes only afterwards: as many
    # chunks as keep the GPU busy, at no memory beyond o.
    rows = state_chunk_rows(n, bh, r, d, q.numel() * q.element_size(), cfg)
    states, states_z = state_pass(k, v, r, False, rows, cfg, scratch=o)
    tiles = cfg.fwd
    per_program, block_v = tiles.tiles_per_program, min(tiles.block_v, d)
    grid = (triton.cdiv(n, tiles.block_m * per_program) * (d // block_v), bh)
    _fmmformer_fwd_kernel[grid](
        q, k, v, o, states, states_z, wn, wf,
        n, h, bandwidth, d**-0.5 * LOG2E, eps,
        R=r, LOWP=lowp(q.dtype), TILES=per_program, BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n, BLOCK_V=block_v, D=d, DOT_PREC=dot_prec(q.dtype),
        **tiles.launch(),
    )
    return o, (Saved(states, states_z, rows) if save else None)
