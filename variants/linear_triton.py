"""Linear attention (SPEC 1.3) in Triton: forward and backward, causal and non-causal.

`o_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps)`; truth is `linear_reference` in `linear.py`.

Rows are cut into *segments* of whole chunks so that every SM has work even for one head
(a two-level scan); per head and segment a program walks its chunks in a loop, which also lets
the compiler prefetch the next chunk's loads.
- Forward: a state pass sums `S = phi(K)^T V` and `z = sum phi(K)` per segment
  (`[BH, NSEG, D, D]`, fp32). Non-causal: segment sums are added into one state per head and a
  second pass applies it to the queries. Causal: an exclusive prefix over segments gives each
  segment its inherited state; its program walks the chunks in order, adding the masked
  intra-chunk `(phi(Q) phi(K)^T * mask) V` (and row sums for the normalizer) and folding each
  chunk into the carried state.
- Backward, with `G = dO / den` and `r = -G . O` (the normalizer's gradient, formed from the
  unrounded numerator `G . num / den`, so the backward never reads the rounded output):
  `dphi(Q) = G S^T + r z` (plus the intra-chunk term when causal), and with
  `dS = phi(Q)^T G`, `dz = phi(Q)^T r` summed over the queries that see a key:
  `dphi(K) = V dS^T + dz`, `dV = phi(K) dS`. A dq pass (in chunk order when causal) also sums
  `dS, dz` per segment; a dk/dv pass applies their total (non-causal), or walks each segment's
  chunks last to first carrying the suffix sums (causal).
Memory beyond inputs and outputs: per-segment `D x D` states and `O(N)` row statistics.
Traffic at D=64 bf16: forward 4 (non-causal) or 6 (causal) passes over an `[N, D]` tensor,
backward 7 (non-causal) or 11 (causal).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from harness.registry import Shape, register_variant, triton_devices
from variants.linear import EPS, FEATURE_MAPS, LINEAR_CHOICES, LINEAR_PARAMS, linear_flops
from variants.triton_common import (
    ObservesLaunch,
    check_qkv,
    empty,
    phi_one_grad,
    sm_count,
    unsupported_shape,
)

PHI_IDS = {name: i for i, name in enumerate(FEATURE_MAPS)}  # elu, elu_neg, tanh -> 0, 1, 2


# ----------------------------------------------------------------------------------------------
# Configs. Segments hold whole units of `seg_rows` rows; every kernel's chunk (the causal chunk
# C, the row block of the other sweeps) must divide that unit.


@dataclass(frozen=True)
class Tiles:
    """Rows per chunk and launch options of one kernel."""

    chunk: int
    num_warps: int
    num_stages: int

    def launch(self) -> dict:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}

    def __str__(self) -> str:
        return f"{self.chunk}w{self.num_warps}s{self.num_stages}"


@dataclass(frozen=True)
class LinearConfig:
    """Every launch choice of the linear-attention kernels for one problem; segments are sized
    to give about `programs_per_sm` programs per SM."""

    state: Tiles  # phi(K)^T V per segment
    fwd: Tiles  # non-causal apply
    fwd_causal: Tiles
    bwd_dq: Tiles  # non-causal dq and dS sums
    bwd_dkdv: Tiles  # non-causal dk, dv
    bwd_dq_causal: Tiles  # dq, r, dS sums
    bwd_dkdv_causal: Tiles
    sm_count: int
    programs_per_sm: int = 4
    seg_rows: int = 64

    def describe(self, causal: bool) -> str:
        """Compact text of the kernels a call of this causality launches, and the SM count."""
        kinds = (("state", "fwd_causal", "bwd_dq_causal", "bwd_dkdv_causal") if causal
                 else ("state", "fwd", "bwd_dq", "bwd_dkdv"))
        return " ".join(f"{kind}={getattr(self, kind)}" for kind in kinds) + f" sms={self.sm_count}"


# Picked from a sweep on an H100 (bf16, B=1, H=16, N=65536, D=64); `linear_config` shrinks the
# chunks for wide operands.
_H100_TILES = dict(
    state=Tiles(64, 4, 3), fwd=Tiles(64, 4, 3), fwd_causal=Tiles(64, 4, 2),
    bwd_dq=Tiles(64, 4, 2), bwd_dkdv=Tiles(64, 8, 3), bwd_dq_causal=Tiles(64, 4, 2),
    bwd_dkdv_causal=Tiles(64, 4, 2),
)


def _narrowed(tiles: Tiles, width: int) -> Tiles:
    """Wide operand tiles (D=128 in bf16, D>=64 in fp32) shrink the chunk and pipeline depth and
    take 8 warps, so that shared memory fits (H100: 227 KB per block) and spills stay moderate."""
    chunk, warps, stages = tiles.chunk, tiles.num_warps, tiles.num_stages
    if width >= 2:
        chunk, stages, warps = min(chunk, 32), min(stages, 2), max(warps, 8)
    if width >= 4:
        chunk, stages = min(chunk, 16), 1
    return Tiles(chunk, warps, stages)


def linear_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> LinearConfig:
    """The launch config for `head_dim` and the inputs' `dtype` on `device`."""
    width = head_dim * (2 if dtype == torch.bfloat16 else 4) // 128  # row bytes / bf16 D=64's
    tiles = {kind: _narrowed(t, width) for kind, t in _H100_TILES.items()}
    return LinearConfig(**tiles, sm_count=sm_count(device))


# ----------------------------------------------------------------------------------------------
# Kernels. Row tiles are masked at N: padded rows get phi = 0 so they add nothing to states.


@triton.jit
def _op(x, LOWP: tl.constexpr):
    # Matmul operand type: bf16 for bf16 inputs, else fp32 (fp16 lacks the exponent range for
    # G = dO / den, whose denominators grow with N).
    if LOWP:
        return x.to(tl.bfloat16)
    else:
        return x.to(tl.float32)


@triton.jit
def _dot(a, b, LOWP: tl.constexpr, PREC: tl.constexpr):
    return tl.dot(_op(a, LOWP), _op(b, LOWP), input_precision=PREC)


@triton.jit
def _linear_state_kernel(
    K, V, S, Z, N, SEG_LEN,
    PHI: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr,
    LOWP: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Per (head, segment): S = phi(K)^T V and z = sum phi(K) over the segment's rows."""
    bh = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1)
    nseg = tl.num_programs(1)
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, D)
    K += bh * N * D  # int64 base; per-element offsets stay int32 (fewer registers)
    V += bh * N * D
    # [D, D]
    acc = tl.zeros([D, D], dtype=tl.float32)
    # [D]
    z = tl.zeros([D], dtype=tl.float32)
    start = seg * SEG_LEN
    end = tl.minimum(start + SEG_LEN, N)
    for off in range(start, end, CHUNK):
        rows = off + offs_c
        valid = rows < N
        tile = rows[:, None] * D + offs_d[None, :]
        # [CHUNK, D]
        k = tl.load(K + tile, mask=valid[:, None], other=0.0).to(tl.float32)
        v = tl.load(V + tile, mask=valid[:, None], other=0.0)
        fk, _ = phi_one_grad(k, PHI)
        fk = tl.where(valid[:, None], fk, 0.0)
        acc += _dot(tl.trans(fk), v, LOWP, PREC)
        z += tl.sum(fk, 0)
    out = (bh * nseg + seg) * D
    tl.store(S + out * D + offs_d[:, None] * D + offs_d[None, :], acc)
    tl.store(Z + out + offs_d, z)


@triton.jit
def _linear_fwd_kernel(
    Q, O, S, Z, N, SEG_LEN, eps,
    PHI: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
    LOWP: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Non-causal apply: o = phi(q) S / (phi(q) . z + eps) over one segment's query tiles.

    A loop (rather than one tile per program) lets the compiler prefetch the next tiles, which
    a memory-bound kernel with few resident programs needs to keep enough loads in flight.
    """
    bh = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    Q += bh * N * D
    O += bh * N * D
    # [D, D] (stored in the operand dtype)
    s = tl.load(S + bh * D * D + offs_d[:, None] * D + offs_d[None, :])
    # [D]
    z = tl.load(Z + bh * D + offs_d)
    start = seg * SEG_LEN
    end = tl.minimum(start + SEG_LEN, N)
    for off in range(start, end, BLOCK_M):
        rows = off + offs_m
        valid = rows < N
        tile = rows[:, None] * D + offs_d[None, :]
        # [BLOCK_M, D]
        q = tl.load(Q + tile, mask=valid[:, None], other=0.0).to(tl.float32)
        fq, _ = phi_one_grad(q, PHI)
        num = _dot(fq, s, LOWP, PREC)
        den = tl.sum(fq * z[None, :], 1) + eps
        tl.store(O + tile, (num / den[:, None]).to(O.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _linear_fwd_causal_kernel(
    Q, K, V, O, DEN, S0, Z0, N, SEG_LEN, eps,
    PHI: tl.constexpr, D: tl.constexpr, BLOCK_V: tl.constexpr, CHUNK: tl.constexpr,
    STORE_DEN: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Causal: one program per (head, segment, value block) walks the segment's chunks.

    Each chunk adds phi(Q) S_prev (inherited state) and the masked intra-chunk product, then
    folds its own phi(K)^T V into the carried state.
    """
    bh = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1)
    vb = tl.program_id(2)
    nseg = tl.num_programs(1)
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, D)
    offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    Q += bh * N * D
    K += bh * N * D
    V += bh * N * D
    O += bh * N * D
    DEN += bh * N
    state = (bh * nseg + seg) * D
    # [D, BLOCK_V] fp32 state inherited from earlier segments (exclusive prefix)
    s = tl.load(S0 + state * D + offs_d[:, None] * D + offs_v[None, :])
    # [D]
    z = tl.load(Z0 + state + offs_d)
    # [CHUNK, CHUNK]
    causal = offs_c[:, None] >= offs_c[None, :]
    start = seg * SEG_LEN
    end = tl.minimum(start + SEG_LEN, N)
    for off in range(start, end, CHUNK):
        rows = off + offs_c
        valid = rows < N
        tile = rows[:, None] * D + offs_d[None, :]
        vtile = rows[:, None] * D + offs_v[None, :]
        # [CHUNK, D]
        q = tl.load(Q + tile, mask=valid[:, None], other=0.0).to(tl.float32)
        k = tl.load(K + tile, mask=valid[:, None], other=0.0).to(tl.float32)
        # [CHUNK, BLOCK_V]
        v = tl.load(V + vtile, mask=valid[:, None], other=0.0)
        fq, _ = phi_one_grad(q, PHI)
        fk, _ = phi_one_grad(k, PHI)
        fk = tl.where(valid[:, None], fk, 0.0)
        # [CHUNK, CHUNK]
        a = tl.where(causal, _dot(fq, tl.trans(fk), LOWP, PREC), 0.0)
        # [CHUNK, BLOCK_V]
        num = _dot(fq, s, LOWP, PREC) + _dot(a, v, LOWP, PREC)
        # [CHUNK]
        den = tl.sum(fq * z[None, :], 1) + tl.sum(a, 1) + eps
        tl.store(O + vtile, (num / den[:, None]).to(O.dtype.element_ty), mask=valid[:, None])
        if STORE_DEN:
            if vb == 0:
                tl.store(DEN + rows, den, mask=valid)
        s += _dot(tl.trans(fk), v, LOWP, PREC)
        z += tl.sum(fk, 0)


@triton.jit
def _linear_bwd_dq_kernel(
    Q, DO, S, Z, DQ, DS, DZ, N, SEG_LEN, eps,
    PHI: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr,
    LOWP: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Non-causal, per (head, segment): dq = (G S^T + r z) phi'(Q), with G = dO / den and
    r = -G . O = -phi(Q) . (G S^T) / den the normalizer's gradient; also sums
    dS = phi(Q)^T G, dz = phi(Q)^T r."""
    bh = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1)
    nseg = tl.num_programs(1)
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, D)
    Q += bh * N * D
    DO += bh * N * D
    DQ += bh * N * D
    # [D, D] S^T (operand dtype), so that dq = G S^T
    s_t = tl.load(S + bh * D * D + offs_d[None, :] * D + offs_d[:, None])
    # [D]
    z = tl.load(Z + bh * D + offs_d)
    # [D, D]
    ds = tl.zeros([D, D], dtype=tl.float32)
    # [D]
    dz = tl.zeros([D], dtype=tl.float32)
    start = seg * SEG_LEN
    end = tl.minimum(start + SEG_LEN, N)
    for off in range(start, end, CHUNK):
        rows = off + offs_c
        valid = rows < N
        tile = rows[:, None] * D + offs_d[None, :]
        # [CHUNK, D]
        q = tl.load(Q + tile, mask=valid[:, None], other=0.0).to(tl.float32)
        do = tl.load(DO + tile, mask=valid[:, None], other=0.0).to(tl.float32)
        fq, dphi = phi_one_grad(q, PHI)
        fq = tl.where(valid[:, None], fq, 0.0)
        # [CHUNK]
        den = tl.sum(fq * z[None, :], 1) + eps
        g = do / den[:, None]
        # [CHUNK, D]
        g_st = _dot(g, s_t, LOWP, PREC)
        r = -tl.sum(fq * g_st, 1) / den
        dfq = g_st + r[:, None] * z[None, :]
        tl.store(DQ + tile, (dfq * dphi).to(DQ.dtype.element_ty), mask=valid[:, None])
        ds += _dot(tl.trans(fq), g, LOWP, PREC)
        dz += tl.sum(r[:, None] * fq, 0)
    out = (bh * nseg + seg) * D
    tl.store(DS + out * D + offs_d[:, None] * D + offs_d[None, :], ds)
    tl.store(DZ + out + offs_d, dz)


@triton.jit
def _linear_bwd_dkdv_kernel(
    K, V, DK, DV, DS, DZ, N, SEG_LEN,
    PHI: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
    LOWP: tl.constexpr, PREC: tl.constexpr, PART: tl.constexpr,
):  # fmt: skip
    """Non-causal keys: dk = (V dS^T + dz) phi'(K), dv = phi(K) dS, over one segment's rows.

    PART 0 writes both; 1 only dk, 2 only dv (for operands too wide to hold dS and dS^T in
    shared memory at once).
    """
    bh = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    base = bh * N * D
    K += base
    V += base
    DK += base
    DV += base
    # [D, D] dS and dS^T (operand dtype)
    if PART != 1:
        ds = tl.load(DS + bh * D * D + offs_d[:, None] * D + offs_d[None, :])
    if PART != 2:
        ds_t = tl.load(DS + bh * D * D + offs_d[None, :] * D + offs_d[:, None])
    # [D]
    dz = tl.load(DZ + bh * D + offs_d)
    start = seg * SEG_LEN
    end = tl.minimum(start + SEG_LEN, N)
    for off in range(start, end, BLOCK_M):
        rows = off + offs_m
        valid = rows < N
        tile = rows[:, None] * D + offs_d[None, :]
        # [BLOCK_M, D]
        k = tl.load(K + tile, mask=valid[:, None], other=0.0).to(tl.float32)
        v = tl.load(V + tile, mask=valid[:, None], other=0.0)
        fk, dphi = phi_one_grad(k, PHI)
        if PART != 2:
            dfk = _dot(v, ds_t, LOWP, PREC) + dz[None, :]
            tl.store(DK + tile, (dfk * dphi).to(DK.dtype.element_ty), mask=valid[:, None])
        if PART != 1:
            dv = _dot(fk, ds, LOWP, PREC)
            tl.store(DV + tile, dv.to(DV.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _causal_bwd_head(Q, K, V, DO, X, Y, DEN, R, N, D: tl.constexpr):
    """A causal backward program's pointers moved to its head (program axis 0): q, k, v, dO and
    the kernel's own two `[N, D]` tensors X, Y, the per-row den and r; and the first element of
    its segment's (axis 1) state row."""
    bh = tl.program_id(0).to(tl.int64)
    base = bh * N * D
    state = (bh * tl.num_programs(1) + tl.program_id(1)) * D
    return (Q + base, K + base, V + base, DO + base, X + base, Y + base, DEN + bh * N,
            R + bh * N, state)


@triton.jit
def _linear_bwd_dq_causal_kernel(
    Q, K, V, DO, DEN, R, S0, Z0, DQ, DS, DZ, N, SEG_LEN,
    PHI: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr,
    LOWP: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Causal dq: one program per (head, segment) walks the segment's chunks in order.

    Carries S^T, z from the segment's inherited state, as the forward did. Also stores r (the
    normalizer's gradient, `-G . num / den` with the numerator's two parts as the forward formed
    them: `phi(Q) S` and the masked intra-chunk scores times V) and sums the segment's
    dS = phi(Q)^T G, dz = phi(Q)^T r for dk, dv.
    (A single reverse sweep for dq, dk, dv moves fewer bytes but carries twice the state, which
    spills registers.)
    """
    seg = tl.program_id(1)
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, D)
    Q, K, V, DO, DQ, _, DEN, R, state = _causal_bwd_head(Q, K, V, DO, DQ, DQ, DEN, R, N, D)
    # [D, D] fp32 S^T inherited from earlier segments; the segment's dS sum
    s_t = tl.load(S0 + state * D + offs_d[None, :] * D + offs_d[:, None])
    ds = tl.zeros([D, D], dtype=tl.float32)
    # [D]
    z = tl.load(Z0 + state + offs_d)
    dz = tl.zeros([D], dtype=tl.float32)
    # [CHUNK, CHUNK]
    causal = offs_c[:, None] >= offs_c[None, :]
    start = seg * SEG_LEN
    end = tl.minimum(start + SEG_LEN, N)
    for off in range(start, end, CHUNK):
        rows = off + offs_c
        valid = rows < N
        tile = rows[:, None] * D + offs_d[None, :]
        # [CHUNK, D]
        k = tl.load(K + tile, mask=valid[:, None], other=0.0)
        v = tl.load(V + tile, mask=valid[:, None], other=0.0)
        q = tl.load(Q + tile, mask=valid[:, None], other=0.0).to(tl.float32)
        do = tl.load(DO + tile, mask=valid[:, None], other=0.0).to(tl.float32)
        # [CHUNK]
        den = tl.load(DEN + rows, mask=valid, other=1.0)
        fk = tl.where(valid[:, None], phi_one_grad(k.to(tl.float32), PHI)[0], 0.0)
        fq, dphi = phi_one_grad(q, PHI)
        fq = tl.where(valid[:, None], fq, 0.0)
        g = do / den[:, None]
        # [CHUNK, D]
        g_st = _dot(g, s_t, LOWP, PREC)
        # [CHUNK, CHUNK] masked scores, and G V^T masked the same way
        a = tl.where(causal, _dot(fq, tl.trans(fk), LOWP, PREC), 0.0)
        g_vt = tl.where(causal, _dot(g, tl.trans(v), LOWP, PREC), 0.0)
        # [CHUNK]
        r = -(tl.sum(fq * g_st, 1) + tl.sum(a * g_vt, 1)) / den
        tl.store(R + rows, r, mask=valid)
        # [CHUNK, CHUNK] gradient of the masked scores (r is the normalizer's share)
        dp = tl.where(causal, g_vt + r[:, None], 0.0)
        dfq = _dot(dp, fk, LOWP, PREC) + g_st + r[:, None] * z[None, :]
        tl.store(DQ + tile, (dfq * dphi).to(DQ.dtype.element_ty), mask=valid[:, None])
        s_t += _dot(tl.trans(v), fk, LOWP, PREC)
        z += tl.sum(fk, 0)
        ds += _dot(tl.trans(fq), g, LOWP, PREC)
        dz += tl.sum(r[:, None] * fq, 0)
    tl.store(DS + state * D + offs_d[:, None] * D + offs_d[None, :], ds)
    tl.store(DZ + state + offs_d, dz)


@triton.jit
def _linear_bwd_dkdv_causal_kernel(
    Q, K, V, DO, DEN, R, DS1, DZ1, DK, DV, N, SEG_LEN,
    PHI: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr,
    LOWP: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Causal dk, dv: one program per (head, segment) walks the segment's chunks last to first,
    carrying dS, dz summed over all later queries (starting from the later segments' sums)."""
    seg = tl.program_id(1)
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, D)
    Q, K, V, DO, DK, DV, DEN, R, state = _causal_bwd_head(Q, K, V, DO, DK, DV, DEN, R, N, D)
    # [D, D] fp32
    ds = tl.load(DS1 + state * D + offs_d[:, None] * D + offs_d[None, :])
    # [D]
    dz = tl.load(DZ1 + state + offs_d)
    # [CHUNK, CHUNK]
    causal = offs_c[:, None] >= offs_c[None, :]
    start = seg * SEG_LEN
    end = tl.minimum(start + SEG_LEN, N)
    last = start + (tl.cdiv(end - start, CHUNK) - 1) * CHUNK
    for i in range(0, tl.cdiv(end - start, CHUNK)):
        rows = last - i * CHUNK + offs_c
        valid = rows < N
        tile = rows[:, None] * D + offs_d[None, :]
        # [CHUNK, D]
        k = tl.load(K + tile, mask=valid[:, None], other=0.0).to(tl.float32)
        v = tl.load(V + tile, mask=valid[:, None], other=0.0)
        q = tl.load(Q + tile, mask=valid[:, None], other=0.0).to(tl.float32)
        do = tl.load(DO + tile, mask=valid[:, None], other=0.0).to(tl.float32)
        # [CHUNK]
        den = tl.load(DEN + rows, mask=valid, other=1.0)
        r = tl.load(R + rows, mask=valid, other=0.0)
        fk, dphi = phi_one_grad(k, PHI)
        fq = tl.where(valid[:, None], phi_one_grad(q, PHI)[0], 0.0)
        g = do / den[:, None]
        # [CHUNK, CHUNK] masked scores and their gradient
        a = tl.where(causal, _dot(fq, tl.trans(fk), LOWP, PREC), 0.0)
        dp = tl.where(causal, _dot(g, tl.trans(v), LOWP, PREC) + r[:, None], 0.0)
        # [CHUNK, D]
        dv = _dot(tl.trans(a), g, LOWP, PREC) + _dot(fk, ds, LOWP, PREC)
        tl.store(DV + tile, dv.to(DV.dtype.element_ty), mask=valid[:, None])
        dfk = _dot(tl.trans(dp), fq, LOWP, PREC) + _dot(v, tl.trans(ds), LOWP, PREC) + dz[None, :]
        tl.store(DK + tile, (dfk * dphi).to(DK.dtype.element_ty), mask=valid[:, None])
        ds += _dot(tl.trans(fq), g, LOWP, PREC)
        dz += tl.sum(r[:, None] * fq, 0)


# ----------------------------------------------------------------------------------------------
# Launch wrappers.


class LinearSaved(NamedTuple):
    """What the backward needs from the forward (no N x D x D tensor).

    Non-causal: `state` `[BH, D, D]` and `z` `[BH, D]`, the global sums (state in the
    matmul operand dtype). Causal: `state` `[BH, NSEG, D, D]` and `z` `[BH, NSEG, D]` fp32, the
    sums over all rows before each segment, and `den` `[BH, N]` fp32 the normalizers.
    """

    state: torch.Tensor
    z: torch.Tensor
    den: torch.Tensor | None
    seg_len: int  # rows per segment


def _seg_chunks(n_chunks: int, bh: int, cfg: LinearConfig) -> int:
    """Segment units per segment so that about `programs_per_sm` programs run per SM."""
    return max(1, triton.cdiv(n_chunks * bh, cfg.programs_per_sm * cfg.sm_count))


def _tiles(cfg: LinearConfig, name: str, seg_len: int) -> Tiles:
    """`name`'s tiles, its chunk checked against the segments."""
    tiles = getattr(cfg, name)
    if seg_len % tiles.chunk:  # a chunk must not straddle two segments
        raise ValueError(f"{name} chunk {tiles.chunk} must divide the segment length {seg_len}")
    return tiles


def _precisions(q: torch.Tensor) -> tuple[bool, str]:
    """(bf16 matmul operands?, tl.dot input precision) for q's dtype.

    bf16 inputs: bf16 operands. fp16 and fp32 inputs: fp32 operands (fp32's range) as 3xTF32
    (about fp32 accuracy on tensor cores; one TF32 product alone rounds to about fp16's
    precision, which would double fp16's error over an fp32-summed reference); exact fp32
    when interpreted.
    """
    if q.dtype == torch.bfloat16:
        return True, "tf32"  # ignored for bf16 operands
    if not q.is_cuda:
        return False, "ieee"
    return False, "tf32x3"


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, feature_map: str) -> None:
    check_qkv("linear_triton", q, k, v)
    if feature_map not in PHI_IDS:
        raise ValueError(f"unknown feature_map '{feature_map}'; valid: {', '.join(PHI_IDS)}")


def linear_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    feature_map: str = "elu",
    eps: float = EPS,
    *,
    save: bool = True,
    seg_chunks: int | None = None,
    config: LinearConfig | None = None,
) -> tuple[torch.Tensor, LinearSaved]:
    """Linear-attention forward (Triton).

    Args:
        q, k, v: `[B, H, N, D]`, fp16/bf16/fp32, D in {16, 32, 64, 128}.
        causal: prefix sums over keys `j <= i`.
        feature_map: `elu` (elu+1, default), `elu_neg` (elu(-x)+1) or `tanh` (tanh+1).
        eps: added to the normalizer.
        save: keep what the backward needs (causal: the `[B*H, N]` normalizers).
        seg_chunks: segment units per segment (default: sized from the SM count).
        config: launch config (default `linear_config(D, q.dtype, q.device)`).

    Returns:
        `o` `[B, H, N, D]` in q's dtype, and the `LinearSaved` for `linear_bwd`.
    """
    _check_inputs(q, k, v, feature_map)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, h, n, d = q.shape
    bh, dev, phi = b * h, q.device, PHI_IDS[feature_map]
    lowp, prec = _precisions(q)
    cfg = config or linear_config(d, q.dtype, dev)
    seg_chunks = seg_chunks or _seg_chunks(triton.cdiv(n, cfg.seg_rows), bh, cfg)
    seg_len = seg_chunks * cfg.seg_rows
    nseg = triton.cdiv(n, seg_len)
    seg_s = empty((bh, nseg, d, d), torch.float32, dev)
    seg_z = empty((bh, nseg, d), torch.float32, dev)
    tiles = _tiles(cfg, "state", seg_len)
    _linear_state_kernel[(bh, nseg)](
        k, v, seg_s, seg_z, n, seg_len, PHI=phi, D=d, CHUNK=tiles.chunk, LOWP=lowp, PREC=prec,
        **tiles.launch(),
    )  # fmt: skip
    o = empty(q.shape, q.dtype, dev)
    if not causal:
        state = seg_s.sum(1).to(torch.bfloat16 if lowp else torch.float32)
        z = seg_z.sum(1)
        tiles = _tiles(cfg, "fwd", seg_len)
        _linear_fwd_kernel[(bh, nseg)](
            q, o, state, z, n, seg_len, eps,
            PHI=phi, D=d, BLOCK_M=tiles.chunk, LOWP=lowp, PREC=prec,
            **tiles.launch(),
        )  # fmt: skip
        return o, LinearSaved(state, z, None, seg_len)
    # Exclusive prefix over segments: the state each segment inherits (kept for the backward).
    s_excl, z_excl = seg_s.cumsum(1) - seg_s, seg_z.cumsum(1) - seg_z
    den = empty((bh, n), torch.float32, dev) if save else o  # o: a placeholder never written
    tiles = _tiles(cfg, "fwd_causal", seg_len)
    block_v = min(d, 64)
    _linear_fwd_causal_kernel[(bh, nseg, d // block_v)](
        q, k, v, o, den, s_excl, z_excl, n, seg_len, eps,
        PHI=phi, D=d, BLOCK_V=block_v, CHUNK=tiles.chunk, STORE_DEN=save, LOWP=lowp,
        PREC=prec, **tiles.launch(),
    )  # fmt: skip
    return o, LinearSaved(s_excl, z_excl, den if save else None, seg_len)


def linear_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    saved: LinearSaved,
    do: torch.Tensor,
    causal: bool,
    feature_map: str = "elu",
    eps: float = EPS,
    config: LinearConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear-attention backward (Triton), through phi and the normalizer.

    Args:
        q, k, v: the forward's inputs, `[B, H, N, D]`.
        saved: the forward's `LinearSaved` (made with `save=True`).
        do: gradient of the output, `[B, H, N, D]`.
        causal, feature_map, eps, config: as in the forward.

    Returns:
        dq, dk, dv in q's dtype.
    """
    _check_inputs(q, k, v, feature_map)
    if causal and saved.den is None:
        raise ValueError("linear_bwd needs a causal forward run with save=True")
    q, k, v, do = (t.contiguous() for t in (q, k, v, do))
    b, h, n, d = q.shape
    bh, dev, phi = b * h, q.device, PHI_IDS[feature_map]
    lowp, prec = _precisions(q)
    cfg = config or linear_config(d, q.dtype, dev)
    seg_len = saved.seg_len
    nseg = triton.cdiv(n, seg_len)
    seg_ds = empty((bh, nseg, d, d), torch.float32, dev)
    seg_dz = empty((bh, nseg, d), torch.float32, dev)
    dq, dk, dv = (empty(q.shape, q.dtype, dev) for _ in range(3))
    if not causal:
        tiles = _tiles(cfg, "bwd_dq", seg_len)
        _linear_bwd_dq_kernel[(bh, nseg)](
            q, do, saved.state, saved.z, dq, seg_ds, seg_dz, n, seg_len, eps,
            PHI=phi, D=d, CHUNK=tiles.chunk, LOWP=lowp, PREC=prec,
            **tiles.launch(),
        )  # fmt: skip
        ds = seg_ds.sum(1).to(torch.bfloat16 if lowp else torch.float32)
        dz = seg_dz.sum(1)
        tiles = _tiles(cfg, "bwd_dkdv", seg_len)
        wide = d * (2 if lowp else 4) >= 512  # fp32 operands at D=128
        for part in (1, 2) if wide else (0,):
            _linear_bwd_dkdv_kernel[(bh, nseg)](
                k, v, dk, dv, ds, dz, n, seg_len,
                PHI=phi, D=d, BLOCK_M=tiles.chunk, LOWP=lowp, PREC=prec, PART=part,
                **tiles.launch(),
            )  # fmt: skip
        return dq, dk, dv
    r = empty((bh, n), torch.float32, dev)
    tiles = _tiles(cfg, "bwd_dq_causal", seg_len)
    _linear_bwd_dq_causal_kernel[(bh, nseg)](
        q, k, v, do, saved.den, r, saved.state, saved.z, dq, seg_ds, seg_dz, n, seg_len,
        PHI=phi, D=d, CHUNK=tiles.chunk, LOWP=lowp, PREC=prec,
        **tiles.launch(),
    )  # fmt: skip
    # Sums over the queries of all later segments (exclusive suffix).
    ds_incl, dz_incl = seg_ds.cumsum(1), seg_dz.cumsum(1)
    ds_after, dz_after = ds_incl[:, -1:] - ds_incl, dz_incl[:, -1:] - dz_incl
    tiles = _tiles(cfg, "bwd_dkdv_causal", seg_len)
    _linear_bwd_dkdv_causal_kernel[(bh, nseg)](
        q, k, v, do, saved.den, r, ds_after, dz_after, dk, dv, n, seg_len,
        PHI=phi, D=d, CHUNK=tiles.chunk, LOWP=lowp, PREC=prec,
        **tiles.launch(),
    )  # fmt: skip
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Autograd and public function.


class LinearAttentionFunction(torch.autograd.Function):
    """Autograd wrapper around `linear_fwd` / `linear_bwd`."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, feature_map: str, eps: float,
                config: LinearConfig | None = None):
        save = any(ctx.needs_input_grad[:3])
        o, saved = linear_fwd(q, k, v, causal, feature_map, eps, save=save, config=config)
        ctx.save_for_backward(q, k, v, saved.state, saved.z, saved.den)
        ctx.seg_len, ctx.causal, ctx.feature_map, ctx.eps = saved.seg_len, causal, feature_map, eps
        ctx.config = config
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, state, z, den = ctx.saved_tensors
        saved = LinearSaved(state, z, den, ctx.seg_len)
        dq, dk, dv = linear_bwd(q, k, v, saved, do, ctx.causal, ctx.feature_map, ctx.eps,
                                config=ctx.config)
        return dq, dk, dv, None, None, None, None


def linear_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    feature_map: str = "elu",
    eps: float = EPS,
    config: LinearConfig | None = None,
) -> torch.Tensor:
    """Linear attention `phi(q_i)^T S_i / (phi(q_i)^T z_i + eps)`, Triton, differentiable.

    Args:
        q, k, v: `[B, H, N, D]`, fp16/bf16/fp32 (fp32 accumulation), D in {16, 32, 64, 128},
            any N.
        causal: keys `j <= i` only (chunked two-level scan) instead of all keys.
        feature_map: `elu` (default, elu+1), `elu_neg` (elu(-x)+1) or `tanh` (tanh+1).
        eps: added to the normalizer (default 1e-6).
        config: launch config (default `linear_config(D, q.dtype, q.device)`).

    Returns:
        `o` `[B, H, N, D]` in q's dtype.
    """
    return LinearAttentionFunction.apply(q, k, v, causal, feature_map, eps, config)


class LinearTriton(ObservesLaunch):
    """The registered callable: linear attention of one feature map and causality, reporting
    the launch config it used."""

    def __init__(self, causal: bool, feature_map: str):
        self.causal, self.feature_map = causal, feature_map

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        config = linear_config(q.shape[-1], q.dtype, q.device)
        self.last_launch = config.describe(self.causal)
        return linear_attention_triton(q, k, v, self.causal, self.feature_map, config=config)


# ----------------------------------------------------------------------------------------------
# Registration.


def check_linear_triton(shape: Shape, params: dict) -> str | None:
    """Head dims and dtypes the kernels take."""
    return unsupported_shape("linear_triton", shape)


@register_variant(
    "linear_triton",
    family="linear",
    params=LINEAR_PARAMS,
    short={"feature_map": "phi"},
    choices=LINEAR_CHOICES,
    devices=triton_devices(),
    check=check_linear_triton,
    reference="linear",
    flops=linear_flops,
)
def make_linear_triton(shape: Shape, feature_map: str):
    """Linear attention in Triton: segment-parallel state reduction, chunked causal scan."""
    return LinearTriton(shape.causal, feature_map)
