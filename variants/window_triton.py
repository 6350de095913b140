"""Sliding-window (banded) softmax attention in Triton: forward and backward (SPEC 1.2).

Forward: flash-style online softmax per query tile, visiting only the key tiles that meet the
band (for queries `[m0, m0 + BLOCK_M)` the keys `[m0 - k, m0 + BLOCK_M + k)`, causal
`[m0 - k, m0 + BLOCK_M)`). Key tiles start at `m0 - k` itself, not at a multiple of BLOCK_N:
a row offset costs nothing in alignment (rows are `D` contiguous elements) and saves a tile
at small k. Each band is split into masked edge tiles and unmasked interior tiles, so the
mask arithmetic runs only where the band edge crosses a tile.

Backward (FlashAttention-2): one kernel per query tile computes `delta = rowsum(dO * O)` and
dQ; a second kernel per key tile walks the query tiles that meet the band for dK and dV.
Only `o` and the logsumexp (N floats per head) are saved; nothing N x N or N x (2k+1) exists.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from harness.registry import Shape, register_variant, triton_devices
from variants.triton_common import (
    LN2_C,
    LOG2E,
    LOG2E_C,
    ObservesLaunch,
    band_limit,
    check_qkv,
    chosen,
    dot,
    empty,
    fastest,
    softmax_bwd_head,
    softmax_dq_rows,
    softmax_kv_cols,
    unsupported_shape,
)
from variants.window import WINDOW_PARAMS, WINDOW_SHORT, check_bandwidth, window_flops


# ---------------------------------------------------------------------------------------------
# Configs. On a GPU each kernel takes the fastest of a few tile candidates, timed once per
# problem (N, D, k, causal, dtype): small k wants short tiles (less band waste), large k long
# ones (more reuse per loaded tile); dK/dV keeps its key tile resident, so its query tiles are
# the short side. The interpreter takes one small, unequal tile pair that exercises every edge.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tiles:
    """Tile sizes and launch options of one kernel."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2

    def launch(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, num_warps=self.num_warps,
                    num_stages=self.num_stages)

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_n}w{self.num_warps}s{self.num_stages}"


@dataclass(frozen=True)
class WindowConfig:
    """The tiles of the forward, dQ and dK/dV kernels (None: not chosen yet)."""

    fwd: Tiles | None
    dq: Tiles | None
    dkdv: Tiles | None

    def __str__(self) -> str:
        return " ".join(f"{kind}={getattr(self, kind) or '-'}" for kind in ("fwd", "dq", "dkdv"))


CANDIDATES = {
    "fwd": (Tiles(64, 64, 4, 2), Tiles(128, 64, 4, 3), Tiles(128, 128, 8, 3)),
    "dq": (Tiles(64, 64, 4, 2), Tiles(128, 64, 8, 2)),
    "dkdv": (Tiles(64, 64, 4, 2), Tiles(32, 64, 4, 2), Tiles(32, 128, 4, 3)),
}
INTERPRET_TILES = {"fwd": Tiles(32, 16, 4, 1), "dq": Tiles(32, 16, 4, 1),
                   "dkdv": Tiles(16, 32, 4, 1)}


def _problem(kernel: str, q: torch.Tensor, band: int, causal: bool) -> tuple:
    return (kernel, *q.shape[-2:], band, bool(causal), q.dtype, q.device)


def choose_tiles(kernel: str, q: torch.Tensor, band: int, causal: bool, launch) -> Tiles:
    """`kernel`'s tiles for this problem: the interpreter's, or on a GPU the fastest candidate
    as `launch(tiles)` runs it (timed on the first call of a problem, remembered after)."""
    if q.device.type != "cuda":
        return INTERPRET_TILES[kernel]
    return fastest(_problem(kernel, q, band, causal), CANDIDATES[kernel], launch)


def window_config(q: torch.Tensor, bandwidth: int, causal: bool) -> WindowConfig:
    """The tiles each kernel runs with for q's problem (on a GPU: those chosen so far)."""
    band = band_limit(q.shape[-2], bandwidth)
    if q.device.type != "cuda":
        return WindowConfig(**INTERPRET_TILES)
    return WindowConfig(*(chosen(_problem(kernel, q, band, causal))
                          for kernel in ("fwd", "dq", "dkdv")))


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _band_split(lo, hi, first_full, last_full, BLOCK: tl.constexpr):
    """Tiles start at lo, lo + BLOCK, ... below hi. Returns (mid_lo, mid_hi): the tiles starting
    in [mid_lo, mid_hi) need no mask (start >= first_full and start + BLOCK - 1 <= last_full)."""
    n_tiles = tl.cdiv(hi - lo, BLOCK)
    # maximum() before dividing: integer division of negatives differs between the compiler
    # (truncation) and the interpreter (floor).
    n_left = tl.minimum(tl.cdiv(tl.maximum(first_full - lo, 0), BLOCK), n_tiles)
    n_fit = tl.minimum(tl.maximum(last_full - lo + 1, 0) // BLOCK, n_tiles)
    return lo + n_left * BLOCK, lo + tl.maximum(n_left, n_fit) * BLOCK


@triton.jit
def query_tile_keys(m0, N, bandwidth, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles for queries [m0, m0 + BLOCK_M): they start at lo and step BLOCK_N below hi;
    those starting in [mid_lo, mid_hi) lie wholly inside every row's band and below N.
    Elementwise, so tests can probe it on vectors of cases. Returns (lo, mid_lo, mid_hi, hi)."""
    lo = tl.maximum(m0 - bandwidth, 0)
    hi = tl.minimum(m0 + BLOCK_M + right, N)
    mid_lo, mid_hi = _band_split(
        lo, hi, m0 + BLOCK_M - 1 - bandwidth, tl.minimum(m0 + right, N - 1), BLOCK_N
    )
    return lo, mid_lo, mid_hi, hi


@triton.jit
def key_tile_queries(n0, N, bandwidth, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query tiles that see keys [n0, n0 + BLOCK_N) (key j is seen by i in [j - right, j + k]),
    stepping BLOCK_M; those in [mid_lo, mid_hi) need no mask. Returns (lo, mid_lo, mid_hi, hi)."""
    lo = tl.maximum(n0 - right, 0)
    hi = tl.minimum(n0 + BLOCK_N + bandwidth, N)
    mid_lo, mid_hi = _band_split(
        lo, hi, n0 + BLOCK_N - 1 - right, tl.minimum(n0 + bandwidth, N - 1), BLOCK_M
    )
    return lo, mid_lo, mid_hi, hi


@triton.jit
def window_fwd_inner(
    acc, m_i, l_i, q, k_ptr, v_ptr, offs_m, start, stop, N, bandwidth, right, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr,
):
    offs_d = tl.arange(0, HEAD_DIM)
    # Value columns: all of them, or (acc narrower than the head) a slice v_ptr starts at.
    offs_v = tl.arange(0, acc.shape[1])
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k_offs = offs_n[:, None] * HEAD_DIM + offs_d[None, :]
        v_offs = offs_n[:, None] * HEAD_DIM + offs_v[None, :]
        # [BLOCK_N, HEAD_DIM], [BLOCK_N, acc columns]
        if MASK:
            kt = tl.load(k_ptr + k_offs, mask=offs_n[:, None] < N, other=0.0)
            vt = tl.load(v_ptr + v_offs, mask=offs_n[:, None] < N, other=0.0)
        else:
            kt = tl.load(k_ptr + k_offs)
            vt = tl.load(v_ptr + v_offs)
        # [BLOCK_M, BLOCK_N], in log2 units
        qk = dot(q, tl.trans(kt), None, PRECISION) * qk_scale
        if MASK:
            rel = offs_n[None, :] - offs_m[:, None]
            inside = (rel >= -bandwidth) & (rel <= right) & (offs_n[None, :] < N)
            # Finite, not -inf: rows past N see no key at all and must not turn into NaN.
            qk = tl.where(inside, qk, -1.0e6)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.math.exp2(m_i - m_new)
        # [BLOCK_M, BLOCK_N]
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = dot(p.to(vt.dtype), vt, acc * alpha[:, None], PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["N", "bandwidth"])
def _window_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, N, bandwidth, qk_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)  # int64: B*H*N*D may pass 2**31
    head = bh * N * HEAD_DIM
    q_ptr += head
    k_ptr += head
    v_ptr += head
    o_ptr += head
    lse_ptr += bh * N

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N
    qo_offs = offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    # [BLOCK_M, HEAD_DIM]
    q = tl.load(q_ptr + qo_offs, mask=row_ok[:, None], other=0.0)

    if CAUSAL:
        right = 0
    else:
        right = bandwidth
    lo, mid_lo, mid_hi, hi = query_tile_keys(m0, N, bandwidth, right, BLOCK_M, BLOCK_N)

    # [BLOCK_M]
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # [BLOCK_M, HEAD_DIM]
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, m_i, l_i = window_fwd_inner(
        acc, m_i, l_i, q, k_ptr, v_ptr, offs_m, lo, mid_lo, N, bandwidth, right, qk_scale,
        HEAD_DIM, BLOCK_N, True, PRECISION,
    )
    acc, m_i, l_i = window_fwd_inner(
        acc, m_i, l_i, q, k_ptr, v_ptr, offs_m, mid_lo, mid_hi, N, bandwidth, right, qk_scale,
        HEAD_DIM, BLOCK_N, False, PRECISION,
    )
    acc, m_i, l_i = window_fwd_inner(
        acc, m_i, l_i, q, k_ptr, v_ptr, offs_m, mid_hi, hi, N, bandwidth, right, qk_scale,
        HEAD_DIM, BLOCK_N, True, PRECISION,
    )
    acc = acc / l_i[:, None]
    tl.store(o_ptr + qo_offs, acc.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + offs_m, (m_i + tl.math.log2(l_i)) * LN2_C, mask=row_ok)


@triton.jit
def _window_bwd_dq_inner(
    dq, q, do, lse2, delta, k_ptr, v_ptr, offs_m, start, stop, N, bandwidth, right, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr,
):
    offs_d = tl.arange(0, HEAD_DIM)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_offs = offs_n[:, None] * HEAD_DIM + offs_d[None, :]
        # [BLOCK_N, HEAD_DIM]
        if MASK:
            kt = tl.load(k_ptr + kv_offs, mask=offs_n[:, None] < N, other=0.0)
            vt = tl.load(v_ptr + kv_offs, mask=offs_n[:, None] < N, other=0.0)
        else:
            kt = tl.load(k_ptr + kv_offs)
            vt = tl.load(v_ptr + kv_offs)
        # [BLOCK_M, BLOCK_N]
        p = tl.math.exp2(dot(q, tl.trans(kt), None, PRECISION) * qk_scale - lse2[:, None])
        if MASK:
            # Keys past N need no mask here: they load as zeros, so ds * k adds exactly 0.
            rel = offs_n[None, :] - offs_m[:, None]
            p = tl.where((rel >= -bandwidth) & (rel <= right), p, 0.0)
        dp = dot(do, tl.trans(vt), None, PRECISION)
        ds = p * (dp - delta[:, None])
        dq = dot(ds.to(kt.dtype), kt, dq, PRECISION)
    return dq


@triton.jit(do_not_specialize=["N", "bandwidth"])
def _window_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    N, bandwidth, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    q_ptr, k_ptr, v_ptr, do_ptr, o_ptr, dq_ptr, lse_ptr, delta_ptr = softmax_bwd_head(
        q_ptr, k_ptr, v_ptr, do_ptr, o_ptr, dq_ptr, lse_ptr, delta_ptr, bh, N, HEAD_DIM)

    offs_m, _, row_ok, qo_offs, q, do, delta, lse2 = softmax_dq_rows(
        q_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, m0, N, HEAD_DIM, BLOCK_M)

    if CAUSAL:
        right = 0
    else:
        right = bandwidth
    lo, mid_lo, mid_hi, hi = query_tile_keys(m0, N, bandwidth, right, BLOCK_M, BLOCK_N)
    # [BLOCK_M, HEAD_DIM]
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _window_bwd_dq_inner(
        dq, q, do, lse2, delta, k_ptr, v_ptr, offs_m, lo, mid_lo, N, bandwidth, right, qk_scale,
        HEAD_DIM, BLOCK_N, True, PRECISION,
    )
    dq = _window_bwd_dq_inner(
        dq, q, do, lse2, delta, k_ptr, v_ptr, offs_m, mid_lo, mid_hi, N, bandwidth, right, qk_scale,
        HEAD_DIM, BLOCK_N, False, PRECISION,
    )
    dq = _window_bwd_dq_inner(
        dq, q, do, lse2, delta, k_ptr, v_ptr, offs_m, mid_hi, hi, N, bandwidth, right, qk_scale,
        HEAD_DIM, BLOCK_N, True, PRECISION,
    )
    tl.store(dq_ptr + qo_offs, (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _window_bwd_dkdv_inner(
    dk, dv, kt, vt, q_ptr, do_ptr, lse_ptr, delta_ptr, offs_n, start, stop, N, bandwidth, right,
    qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr,
):
    offs_d = tl.arange(0, HEAD_DIM)
    for m0 in range(start, stop, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        qo_offs = offs_m[:, None] * HEAD_DIM + offs_d[None, :]
        # [BLOCK_M, HEAD_DIM]
        if MASK:
            row_ok = offs_m < N
            q = tl.load(q_ptr + qo_offs, mask=row_ok[:, None], other=0.0)
            do = tl.load(do_ptr + qo_offs, mask=row_ok[:, None], other=0.0)
            # [BLOCK_M]
            lse2 = tl.load(lse_ptr + offs_m, mask=row_ok, other=0.0) * LOG2E_C
            delta = tl.load(delta_ptr + offs_m, mask=row_ok, other=0.0)
        else:
            q = tl.load(q_ptr + qo_offs)
            do = tl.load(do_ptr + qo_offs)
            lse2 = tl.load(lse_ptr + offs_m) * LOG2E_C
            delta = tl.load(delta_ptr + offs_m)
        # [BLOCK_N, BLOCK_M]: the transposed problem, so dK and dV come out row-major.
        pt = tl.math.exp2(dot(kt, tl.trans(q), None, PRECISION) * qk_scale - lse2[None, :])
        if MASK:
            # Rows past N need no mask: q and dO load as zeros there, so they add exactly 0.
            rel = offs_n[:, None] - offs_m[None, :]
            pt = tl.where((rel >= -bandwidth) & (rel <= right), pt, 0.0)
        dv = dot(pt.to(do.dtype), do, dv, PRECISION)
        dpt = dot(vt, tl.trans(do), None, PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk = dot(dst.to(q.dtype), q, dk, PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["N", "bandwidth"])
def _window_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    N, bandwidth, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    n0 = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, lse_ptr, delta_ptr = softmax_bwd_head(
        q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, lse_ptr, delta_ptr, bh, N, HEAD_DIM)
    offs_n, _, col_ok, kv_offs, kt, vt = softmax_kv_cols(k_ptr, v_ptr, n0, N, HEAD_DIM, BLOCK_N)

    if CAUSAL:
        right = 0
    else:
        right = bandwidth
    lo, mid_lo, mid_hi, hi = key_tile_queries(n0, N, bandwidth, right, BLOCK_M, BLOCK_N)
    # [BLOCK_N, HEAD_DIM]
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dk, dv = _window_bwd_dkdv_inner(
        dk, dv, kt, vt, q_ptr, do_ptr, lse_ptr, delta_ptr, offs_n, lo, mid_lo, N, bandwidth, right,
        qk_scale, HEAD_DIM, BLOCK_M, True, PRECISION,
    )
    dk, dv = _window_bwd_dkdv_inner(
        dk, dv, kt, vt, q_ptr, do_ptr, lse_ptr, delta_ptr, offs_n, mid_lo, mid_hi, N, bandwidth,
        right, qk_scale, HEAD_DIM, BLOCK_M, False, PRECISION,
    )
    dk, dv = _window_bwd_dkdv_inner(
        dk, dv, kt, vt, q_ptr, do_ptr, lse_ptr, delta_ptr, offs_n, mid_hi, hi, N, bandwidth, right,
        qk_scale, HEAD_DIM, BLOCK_M, True, PRECISION,
    )
    tl.store(dk_ptr + kv_offs, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv_ptr + kv_offs, dv.to(dv_ptr.dtype.element_ty), mask=col_ok[:, None])


# ---------------------------------------------------------------------------------------------
# Launch wrappers
# ---------------------------------------------------------------------------------------------
def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bandwidth: int) -> None:
    check_qkv("window_triton", q, k, v)
    if bandwidth < 0:
        raise ValueError(f"bandwidth must be >= 0, got {bandwidth}")


def _launch_args(q: torch.Tensor, bandwidth: int) -> tuple[int, int, int, float, str]:
    """(B*H, N, effective k, qk scale in log2 units, dot precision)."""
    batch, heads, n, d = q.shape
    # fp32 inputs get exact fp32 dots (no tf32): whoever asks for fp32 wants the accuracy.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    return batch * heads, n, band_limit(n, bandwidth), d**-0.5 * LOG2E, precision


def _empty_or(out: torch.Tensor | None, like: torch.Tensor, shape, dtype) -> torch.Tensor:
    if out is None:
        return empty(shape, dtype, like.device)
    if out.shape != torch.Size(shape) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out tensor must be contiguous {dtype} of shape {tuple(shape)}")
    return out


def window_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bandwidth: int,
    causal: bool,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    tiles: Tiles | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Banded softmax attention forward.

    Args:
        q, k, v: `[B, H, N, D]`, one dtype of fp16/bf16/fp32, D in {16, 32, 64, 128}.
        bandwidth: k >= 0; query i sees keys `|i - j| <= k` (causal `i - k <= j <= i`).
        causal: drop keys after the query.
        out: optional preallocated `(o, lse)` to write into.
        tiles: the kernel's tiles (default `choose_tiles`).

    Returns:
        `o` `[B, H, N, D]` in the input dtype and `lse` `[B, H, N]` fp32, the natural-log
        logsumexp of each row's scaled scores `D**-0.5 q_i . k_j` over its window.
    """
    _check_inputs(q, k, v, bandwidth)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    bh, n, band, qk_scale, precision = _launch_args(q, bandwidth)
    o = _empty_or(out[0] if out else None, q, q.shape, q.dtype)
    lse = _empty_or(out[1] if out else None, q, q.shape[:-1], torch.float32)
    if n == 0 or bh == 0:
        return o, lse

    def launch(t: Tiles) -> None:
        _window_fwd_kernel[(triton.cdiv(n, t.block_m), bh)](
            q, k, v, o, lse, n, band, qk_scale,
            HEAD_DIM=q.shape[-1], CAUSAL=bool(causal), PRECISION=precision, **t.launch(),
        )

    launch(tiles or choose_tiles("fwd", q, band, causal, launch))
    return o, lse


def window_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    bandwidth: int,
    causal: bool,
    *,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    config: WindowConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Banded softmax attention backward (FlashAttention-2 style, recomputing the scores).

    Args:
        q, k, v, o: `[B, H, N, D]` as given to and returned by `window_fwd`.
        lse: `[B, H, N]` fp32 from `window_fwd`.
        do: `[B, H, N, D]` gradient of the loss with respect to `o`.
        bandwidth, causal: as in `window_fwd`.
        out: optional preallocated `(dq, dk, dv)` to write into.
        config: the dQ and dK/dV kernels' tiles (a None entry: `choose_tiles`).

    Returns:
        `(dq, dk, dv)`, each `[B, H, N, D]` in the input dtype.
    """
    _check_inputs(q, k, v, bandwidth)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o, do, lse = o.contiguous(), do.to(q.dtype).contiguous(), lse.contiguous()
    bh, n, band, qk_scale, precision = _launch_args(q, bandwidth)
    dq, dk, dv = (_empty_or(out[i] if out else None, q, q.shape, q.dtype) for i in range(3))
    if n == 0 or bh == 0:
        return dq, dk, dv
    delta = empty(lse.shape, torch.float32, q.device)
    common = dict(HEAD_DIM=q.shape[-1], CAUSAL=bool(causal), PRECISION=precision)
    sm_scale = q.shape[-1] ** -0.5
    tiles = config or WindowConfig(None, None, None)

    # dQ first: it also writes delta, which the dK/dV kernel reads.
    def launch_dq(t: Tiles) -> None:
        _window_bwd_dq_kernel[(triton.cdiv(n, t.block_m), bh)](
            q, k, v, o, do, lse, delta, dq, n, band, qk_scale, sm_scale, **common, **t.launch(),
        )

    def launch_dkdv(t: Tiles) -> None:
        _window_bwd_dkdv_kernel[(triton.cdiv(n, t.block_n), bh)](
            q, k, v, do, lse, delta, dk, dv, n, band, qk_scale, sm_scale, **common, **t.launch(),
        )

    launch_dq(tiles.dq or choose_tiles("dq", q, band, causal, launch_dq))
    launch_dkdv(tiles.dkdv or choose_tiles("dkdv", q, band, causal, launch_dkdv))
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# Autograd and public function
# ---------------------------------------------------------------------------------------------
class _WindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bandwidth: int, causal: bool, config: WindowConfig | None):
        o, lse = window_fwd(q, k, v, bandwidth, causal, tiles=config.fwd if config else None)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.bandwidth, ctx.causal, ctx.config = bandwidth, causal, config
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = window_bwd(q, k, v, o, lse, do, ctx.bandwidth, ctx.causal, config=ctx.config)
        return dq, dk, dv, None, None, None


def window_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bandwidth: int, causal: bool,
    config: WindowConfig | None = None,
) -> torch.Tensor:
    """Banded softmax attention with Triton forward and backward (differentiable in q, k, v).

    Args:
        q, k, v: `[B, H, N, D]`, fp16/bf16/fp32, D in {16, 32, 64, 128}, any N.
        bandwidth: k >= 0 (k >= N is full attention).
        causal: window `i - k <= j <= i` instead of `|i - j| <= k`.
        config: the kernels' tiles (default, or a None entry: `choose_tiles`).

    Returns:
        `o` `[B, H, N, D]` in the input dtype. Saves only `o` and the logsumexp for backward.
    """
    return _WindowAttention.apply(q, k, v, bandwidth, causal, config)


class WindowTriton(ObservesLaunch):
    """The registered callable: banded attention of one bandwidth and causality, reporting the
    tiles its kernels ran with."""

    def __init__(self, bandwidth: int, causal: bool):
        self.bandwidth, self.causal = bandwidth, causal
        self.problem: torch.Tensor | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.problem = q.new_empty((0, *q.shape[-2:]))  # N, D, dtype and device; no data
        return window_attention_triton(q, k, v, self.bandwidth, self.causal)

    @property
    def last_launch(self) -> str | None:
        """The tiles of the last call's problem (on a GPU: those chosen by now, the backward's
        once a backward ran)."""
        if self.problem is None:
            return None
        return str(window_config(self.problem, self.bandwidth, self.causal))


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------
def check_window_triton(shape: Shape, params: dict) -> str | None:
    return unsupported_shape("window_triton", shape) or check_bandwidth(shape, params)


@register_variant(
    "window_triton",
    family="window",
    params=WINDOW_PARAMS,
    short=WINDOW_SHORT,
    devices=triton_devices(),
    requires=("triton",),
    check=check_window_triton,
    reference="window",
    flops=window_flops,
)
def make_window_triton(shape: Shape, bandwidth: int):
    """Banded softmax attention, Triton flash-style kernels over the band's tiles only."""
    return WindowTriton(bandwidth, shape.causal)
