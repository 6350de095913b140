"""FMMformer far-field states: the passes that reduce `S_l = sum_i phi_l(a_i) b_i^T` and
`z_l = sum_i phi_l(a_i)` per chunk of rows (the forward's from K, V; the backward's dual states
from Q and the weighted dO), the scan that turns chunk sums into prefix (or suffix) states, and
the jit helpers that address a `[B*H, slots, R, D, D]` state buffer."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from variants.fmmformer_triton.configs import FMMConfig
from variants.triton_common import dot, empty, exp_neg_abs, phi_map


@triton.jit
def mm(x, ref, LOWP: tl.constexpr):
    # Far-field matmul operands: the input dtype for bf16 (range to spare), fp32 otherwise
    # (fp16 could overflow in states summed over N keys).
    if LOWP:
        y = x.to(ref.dtype)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _columns16(x, dtype):
    """`[len(x), 16]`: x in every column, as a matmul operand that sums rows weighted by x."""
    return (x[:, None] + tl.zeros([x.shape[0], 16], dtype=tl.float32)).to(dtype)


@triton.jit
def _state_base(P, PZ, bh, slot, n_slots, which, R: tl.constexpr, D: tl.constexpr):
    """Base pointers of state `[bh, slot, which]` of a `[B*H, n_slots, R, D, D]` buffer and
    of its z (`[B*H, n_slots, R, D]`)."""
    idx = (bh * n_slots + slot) * R + which
    return P + idx * D * D, PZ + idx * D


@triton.jit
def state_ptrs(P, PZ, bh, slot, n_slots, which, R: tl.constexpr, D: tl.constexpr,
                v0=0, BLOCK_V: tl.constexpr = None):
    """Pointers to state `[bh, slot, which]` (`[D, BLOCK_V]`: its columns from v0, all by
    default) and to its z (`[D]`)."""
    offs = tl.arange(0, D)
    if BLOCK_V is None:
        cols = offs
    else:
        cols = v0 + tl.arange(0, BLOCK_V)
    sp, zp = _state_base(P, PZ, bh, slot, n_slots, which, R, D)
    return sp + offs[:, None] * D + cols[None, :], zp + offs


@triton.jit
def store_state(P, PZ, bh, slot, n_slots, s, z, v0, L: tl.constexpr, R: tl.constexpr,
                 D: tl.constexpr):
    # Every column block stores the same z (a benign duplicate write).
    sp, zp = state_ptrs(P, PZ, bh, slot, n_slots, L, R, D, v0, s.shape[1])
    tl.store(sp, s)
    tl.store(zp, z)


@triton.jit
def load_state(P, PZ, bh, slot, n_slots, v0, L: tl.constexpr, R: tl.constexpr,
                D: tl.constexpr, BLOCK_V: tl.constexpr):
    sp, zp = state_ptrs(P, PZ, bh, slot, n_slots, L, R, D, v0, BLOCK_V)
    return tl.load(sp), tl.load(zp)


@triton.jit
def load_states(P, PZ, bh, slot, n_slots, v0, R: tl.constexpr, D: tl.constexpr,
                 BLOCK_V: tl.constexpr):
    """The states of every map in `slot` (those past R repeat map 0), columns from v0."""
    s0, z0 = load_state(P, PZ, bh, slot, n_slots, v0, 0, R, D, BLOCK_V)
    s1, z1 = s0, z0
    s2, z2 = s0, z0
    if R > 1:
        s1, z1 = load_state(P, PZ, bh, slot, n_slots, v0, 1, R, D, BLOCK_V)
    if R > 2:
        s2, z2 = load_state(P, PZ, bh, slot, n_slots, v0, 2, R, D, BLOCK_V)
    return s0, z0, s1, z1, s2, z2


@triton.jit
def _state_add(s, z, a, ea, ok, b, WB, WZ, rows, N, wf, L: tl.constexpr,
               WEIGHTED: tl.constexpr, LOWP: tl.constexpr, DOT_PREC: tl.constexpr):
    """Adds one row tile to state L: phi_L(a)^T b and sum phi_L(a) (see the state kernel).
    z is a `[D, 16]` accumulator of phi_L(a)^T 1 (or ^T dden), every column the same: the row
    sum runs on the tensor cores from the operand the state product has already staged (a
    reduction across warps per tile is slower)."""
    fa = tl.where(ok[:, None], phi_map(a, ea, L), 0.0)
    fa_t = tl.trans(mm(fa, b, LOWP))
    if WEIGHTED:
        den = tl.load(WB + L * N + rows, mask=ok, other=1.0)
        dden = tl.load(WZ + L * N + rows, mask=ok, other=0.0)
        z = dot(fa_t, _columns16(dden, fa_t.dtype), z, DOT_PREC)
        # The rows' weights scale phi(a), not b: with b scaled in registers, a split of the
        # value columns (BLOCK_V 32 or 16 at D = 64) gave wrong sums or an illegal address on
        # sm_90 builds of Triton 3.6; this way the split gives the sums of all columns at once.
        fa_t = tl.trans(mm(fa * (wf / den)[:, None], b, LOWP))
        b_m = mm(b, b, LOWP)
    else:
        z = dot(fa_t, tl.full([fa.shape[0], 16], 1.0, dtype=fa_t.dtype), z, DOT_PREC)
        b_m = mm(b, b, LOWP)
    return dot(fa_t, b_m, s, DOT_PREC), z


@triton.jit
def _fmmformer_state_kernel(
    A, B, WB, WZ, WF, P, PZ,
    N, H, rows_per_chunk,
    R: tl.constexpr, WEIGHTED: tl.constexpr, LOWP: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_V: tl.constexpr, D: tl.constexpr, DOT_PREC: tl.constexpr,
    MAP0: tl.constexpr = 0,
):
    """Chunk states of maps MAP0 + l, l < R (stored as map l): sum_i phi(a_i) b_i^T and
    sum_i phi(a_i), one program per (chunk, head, BLOCK_V columns of b), so a row tile is read
    once for all maps (splitting the columns trades re-reads of a for fewer registers per
    program).

    Plain (A=K, B=V): the forward states S_l, z_l. Weighted (A=Q, B=dO): rows of B scaled by
    w_far / den_l and the vector sum weighted by dL/d den_l: the backward dual states U_l, u_l."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    v0 = tl.program_id(2) * BLOCK_V
    n_chunks = tl.num_programs(0)
    A += bh * N * D
    B += bh * N * D + v0
    offs_d = tl.arange(0, D)
    offs_v = tl.arange(0, BLOCK_V)
    wf = 1.0
    if WEIGHTED:
        wf = tl.load(WF + bh % H).to(tl.float32)
        WB += bh * R * N
        WZ += bh * R * N
    # [D, BLOCK_V] per map
    s0 = tl.zeros([D, BLOCK_V], dtype=tl.float32)
    s1 = tl.zeros([D, BLOCK_V], dtype=tl.float32)
    s2 = tl.zeros([D, BLOCK_V], dtype=tl.float32)
    # [D, 16] per map, its columns equal (see `_state_add`)
    z0 = tl.zeros([D, 16], dtype=tl.float32)
    z1 = tl.zeros([D, 16], dtype=tl.float32)
    z2 = tl.zeros([D, 16], dtype=tl.float32)
    lo = c * rows_per_chunk
    hi = tl.minimum(lo + rows_per_chunk, N)
    for start in range(lo, hi, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        ok = rows < hi
        # [BLOCK, D]
        a = tl.load(A + rows[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0)
        b = tl.load(B + rows[:, None] * D + offs_v[None, :], mask=ok[:, None], other=0.0)
        ea = exp_neg_abs(a)
        s0, z0 = _state_add(s0, z0, a, ea, ok, b, WB, WZ, rows, N, wf, MAP0 + 0,
                            WEIGHTED, LOWP, DOT_PREC)
        if R > 1:
            s1, z1 = _state_add(s1, z1, a, ea, ok, b, WB, WZ, rows, N, wf, MAP0 + 1,
                                WEIGHTED, LOWP, DOT_PREC)
        if R > 2:
            s2, z2 = _state_add(s2, z2, a, ea, ok, b, WB, WZ, rows, N, wf, MAP0 + 2,
                                WEIGHTED, LOWP, DOT_PREC)
    store_state(P, PZ, bh, c, n_chunks, s0, tl.max(z0, 1), v0, 0, R, D)
    if R > 1:
        store_state(P, PZ, bh, c, n_chunks, s1, tl.max(z1, 1), v0, 1, R, D)
    if R > 2:
        store_state(P, PZ, bh, c, n_chunks, s2, tl.max(z2, 1), v0, 2, R, D)


@triton.jit
def _fmmformer_scan_kernel(SRC, SRCZ, DST, DSTZ, n_chunks,
                           R: tl.constexpr, D: tl.constexpr, BLOCK_P: tl.constexpr,
                           REVERSE: tl.constexpr):
    """Per (head, l, row of the state; row D is z): from the states of `n_chunks` consecutive
    chunks (SRC), each chunk's exclusive prefix sum (suffix sum if REVERSE), into DST, which
    may be SRC (in place: a block's chunks are all read before any is written). BLOCK_P chunks
    at a time are loaded together and scanned with `tl.cumsum`, so the loads of a block wait
    on nothing."""
    bh = tl.program_id(0).to(tl.int64)
    which = tl.program_id(1)
    row = tl.program_id(2)
    cols = tl.arange(0, D)
    # Row `row` of every chunk's state, or (row D) every chunk's z.
    src, src_z = _state_base(SRC, SRCZ, bh, 0, n_chunks, which, R, D)
    dst, dst_z = _state_base(DST, DSTZ, bh, 0, n_chunks, which, R, D)
    if row < D:
        src += row * D
        dst += row * D
        stride = R * D * D
    else:
        src = src_z
        dst = dst_z
        stride = R * D
    carry = tl.zeros([D], dtype=tl.float32)
    for start in range(0, n_chunks, BLOCK_P):
        step = start + tl.arange(0, BLOCK_P)
        ok = step < n_chunks
        chunk = n_chunks - 1 - step if REVERSE else step
        # [BLOCK_P, D], in scan order
        x = tl.load(src + chunk[:, None] * stride + cols[None, :], mask=ok[:, None], other=0.0)
        excl = carry[None, :] + tl.cumsum(x, 0) - x
        carry += tl.sum(x, 0)
        tl.store(dst + chunk[:, None] * stride + cols[None, :], excl, mask=ok[:, None])


def lowp(dtype: torch.dtype) -> bool:
    """Far-field matmul operands in the input dtype (bf16), else in fp32."""
    return dtype == torch.bfloat16


def dot_prec(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products; half inputs never reach an fp32 x fp32 dot except
    # fp16 far-field products (fp32 operands: fp16 states would overflow), as 3xTF32: one
    # TF32 product rounds to about fp16's own precision, which alone doubles the gradients'
    # error over an fp32-summed reference.
    return {torch.float32: "ieee", torch.float16: "tf32x3"}.get(dtype, "tf32")


@dataclass
class Saved:
    """Forward results backward needs."""

    # Non-causal: the global states ([B*H, 1, r, D, D] matmul dtype, [B*H, 1, r, D] fp32).
    # Causal: slot c holds the state of every key before chunk c (its exclusive prefix).
    states: torch.Tensor
    states_z: torch.Tensor
    chunk_rows: int


# The backward's dual-state weights: per-row den_l, dL/d den_l (`[B*H, r, N]` fp32) and w_far.
Weights = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def state_pass(
    a: torch.Tensor,
    b: torch.Tensor,
    r: int,
    causal: bool,
    chunk_rows: int,
    cfg: FMMConfig,
    weights: Weights | None = None,
    scratch: torch.Tensor | None = None,
    map0: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """States sum_i phi_l(a_i) b_i^T and sum_i phi_l(a_i) per chunk of `chunk_rows` rows, for
    the maps map0 .. map0 + r - 1 (stored as 0 .. r - 1).

    `weights` = (den, dden, w_far) gives the backward's dual states instead (package docstring).
    Causal: the chunk states, `[B*H, chunks, r, D, D]` and `[B*H, chunks, r, D]`, fp32.
    Non-causal: their sum, `[B*H, 1, r, D, D]` in the matmul dtype and `[B*H, 1, r, D]` fp32.
    The chunk partials may live in `scratch` (a tensor not yet written, e.g. the output),
    where large enough.
    """
    bsz, h, n, d = a.shape
    bh, dev = bsz * h, a.device
    tiles = cfg.state
    chunks = triton.cdiv(n, chunk_rows)
    shape, shape_z = (bh, chunks, r, d, d), (bh, chunks, r, d)
    n_s, n_z = _numel(shape), _numel(shape_z)
    if scratch is not None and _fits(scratch, _state_floats(bh, chunks, r, d)):
        flat = scratch.view(-1).view(torch.uint8)[: 4 * (n_s + n_z)].view(torch.float32)
        states, states_z = flat[:n_s].view(shape), flat[n_s:].view(shape_z)
    else:
        states = empty(shape, torch.float32, dev)
        states_z = empty(shape_z, torch.float32, dev)
    den, dden, wf = weights if weights is not None else (states, states, states)
    block_v = min(tiles.block_v, d)
    _fmmformer_state_kernel[(chunks, bh, d // block_v)](
        a, b, den, dden, wf, states, states_z,
        n, h, chunk_rows,
        R=r, WEIGHTED=weights is not None, LOWP=lowp(a.dtype),
        BLOCK=min(tiles.block_m, chunk_rows), BLOCK_V=block_v, D=d,
        DOT_PREC=dot_prec(a.dtype), MAP0=map0, **tiles.launch(),
    )
    if causal:
        return states, states_z
    summed = states.sum(1, keepdim=True).to(a.dtype if lowp(a.dtype) else torch.float32)
    return summed, states_z.sum(1, keepdim=True)


def _numel(shape: tuple[int, ...]) -> int:
    return int(torch.Size(shape).numel())


def _state_floats(bh: int, slots: int, r: int, d: int) -> int:
    """fp32 values of `slots` states of every map and head: `[D, D]` plus z `[D]` each."""
    return bh * slots * r * d * (d + 1)


def _fits(scratch: torch.Tensor, n_floats: int) -> bool:
    """Whether `n_floats` fp32 values fit in contiguous `scratch`'s bytes."""
    return scratch.is_contiguous() and 4 * n_floats <= scratch.numel() * scratch.element_size()


def scan(states: torch.Tensor, states_z: torch.Tensor, reverse: bool) -> None:
    """In place: each chunk's state `[B*H, chunks, r, D, D]` and z `[B*H, chunks, r, D]`
    becomes the sum of the chunks before it (after it, if `reverse`)."""
    bh, n_chunks, r, d, _ = states.shape
    _fmmformer_scan_kernel[(bh, r, d + 1)](
        states, states_z, states, states_z, n_chunks,
        R=r, D=d, BLOCK_P=min(64, triton.next_power_of_2(n_chunks)), REVERSE=reverse,
        num_warps=4,
    )


def prefix_states(
    a: torch.Tensor, b: torch.Tensor, chunk_rows: int, cfg: FMMConfig, map0: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal: for map `map0`, every chunk's exclusive prefix state of the keys before it,
    `[B*H, chunks, 1, D, D]` and `[B*H, chunks, 1, D]` fp32 (states as `state_pass`)."""
    states, states_z = state_pass(a, b, 1, True, chunk_rows, cfg, map0=map0)
    scan(states, states_z, reverse=False)
    return states, states_z


def chunk_rows(n: int, bh: int, r: int, d: int, block: int, programs: int, budget: float) -> int:
    """Rows per state chunk: at most `programs` programs in all (a whole number of waves when
    that is what fits at once; at least one chunk per head), a multiple of `block`, and few
    enough chunks that their states (`bh * r * d * (d + 1)` floats each) fit in `budget` bytes."""
    tiles = triton.cdiv(n, block)
    cap = max(1, int(budget // (4 * _state_floats(bh, 1, r, d))))
    chunks = max(1, min(tiles, programs // bh, cap))
    return block * triton.cdiv(tiles, chunks)


def state_chunk_rows(n: int, bh: int, r: int, d: int, budget: float, cfg: FMMConfig) -> int:
    """Non-causal chunks only spread the state pass over the GPU; their partials take at most
    `budget` bytes."""
    programs = cfg.state_programs_per_sm * cfg.sm_count
    return chunk_rows(n, bh, r, d, cfg.state.block_m, programs, budget)
