"""FMMformer (SPEC 1.4) as fused Triton kernels: band, far field and blend in one pass.

`o = w_near * Near + w_far * sum_{l<=r} Far_l`, Near the banded softmax of bandwidth k, Far_l
linear attention with phi_l (elu+1, elu(-x)+1, tanh+1: the authors' tanh+1, SPEC 1.4) over all
keys, or the prefix when causal.

Forward: a state pass reduces `S_l = phi_l(K)^T V` and `z_l = sum phi_l(K)` per chunk of rows
(one program per chunk and head computes every map from one read of each tile, the sums z_l
as tensor-core products); then one kernel walks query tiles, computing the band with
window_triton's online softmax over the key tiles that meet it, the r far-field terms and the
blend, writing `o` once. Non-causal: the chunk states are summed into one global state (the
partials live in `o`, not yet written) and each program takes one tile, under a register cap
that fits four programs per SM. Causal: the state pass runs over parts of each chunk (partials
in `o`) and a scan sums them into each chunk's prefix; one program per chunk (one per SM: the
chunks make whole waves) walks its tiles in order, carrying the three fp32 states in registers
and adding the masked intra-tile products (their weighted sum over maps takes one matmul with
V). By default (`CAUSAL_MAP_PASSES`) the causal forward instead runs a band pass writing
w_near * Near into o, then per map its chunk prefix states and a walk with that one state (four
programs per SM) adding w_far Far_l to o: o is rounded to its dtype four times instead of
once (bf16 at N = 2^16: 4e-3 apart from the fused walk; 3.9e-3 from the float64 reference
against 2.1e-3 non-causal), and the forward takes 1.72 ms instead of 2.57 on the H100.

Backward, non-causal: `dq` takes query tiles (far field, then band), storing each row's far
normalizers `den_l` and `dL/d den_l`; a weighted state pass reduces the dual states
`U_l = sum_i phi_l(q_i) (w_far dO_i / den_l,i)^T`; `dk, dv` takes key tiles (band, then the far
field from `U_l`). dL/dw_near and dL/dw_far come from per-program partial sums. Causal, in
passes as the forward: per far-field map a query-side walk over the forward's chunks from their
kept prefix states (dq, den_l, dL/d den_l, dO . Far_l, and each chunk's sum of U_l), an in-place
suffix scan of those sums, and a key-side walk last to first (dk, dv); then the band's dq (and
its softmax delta) and dk, dv. Each walk holds one fp32 state; the gradients are accumulated
in their own dtype across the passes (bf16: rounded four times, to nearest).

Memory: forward-only calls allocate `o` plus, causal, one map's chunk states at a time
(`chunks * B * H * D * (D+1)` floats, under 9% of `o` or 8 MiB, whichever is more; the fused
walk's hold every map's under the same cap). With grad, the forward also keeps the
log-sum-exp and, causal, every map's chunk states (the backward starts from them), and nothing
else. The backward's band dq walks the band's keys twice per query tile: first summing, in
fp32 from the band alone, P's row sums (whose reciprocals rescale P in both band kernels:
recomputed scores can differ from the forward's in their last bits) and the softmax delta
`w_near dO . Near = w_near sum_j P_ij dO_i . v_j`, then adding dS K. (The delta taken as
`dO . o - w_far sum_l dO . Far_l` needs no second walk but loses the band's digits to
cancellation when the far field dominates o, most of them in bf16.) dL/dw_near is summed
from the same P and dO V^T, so nothing is divided by w_near. Beyond the gradients the backward
takes `O(N)` row statistics and, causal, one map's chunk dual sums.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from harness.registry import Shape, register_variant, triton_devices
from variants.fmmformer import (
    FMM_CHOICES,
    FMM_PARAMS,
    FMM_SHORT,
    FMMformerAttention,
    fmm_flops,
)
from variants.linear import EPS
from variants.window import check_bandwidth
from variants.window_triton import _query_tile_keys, _window_fwd_inner

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch options of one kernel."""

    block_m: int = 64  # rows of the walked tiles (queries, or keys in dk/dv)
    block_n: int = 64  # rows of the band's inner tiles
    num_warps: int = 4
    num_stages: int = 2
    tiles_per_program: int = 1  # non-causal only: consecutive tiles one program walks
    block_v: int = 128  # non-causal: value columns per program (capped at D)
    maxnreg: int | None = None  # register cap per thread (more programs per SM, maybe spills)

    def launch(self) -> dict:
        """Launch options of a kernel call."""
        opts = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.maxnreg is not None:
            opts["maxnreg"] = self.maxnreg
        return opts


# Per kernel, per head dim. D=64 from H100 sweeps (`python tests/test_fmmformer_triton.py
# --sweep` and `python scripts/fmm_probe.py state regs fwd`, bf16, H=16, N=65536, logs in
# results/h100/fmmformer_triton_logs; fwd or fwd_bwd ms): state pass 4 warps 3 stages (0.837
# fwd, 8 warps 1.07), forward 64 x 64 tiles 4 warps 1 stage, capped at 128 registers (fwd
# 0.655; uncapped 0.73: its 254 registers fit 2 programs per SM, 128 fit 4 despite spills;
# 128-row tiles 0.97, 32 value columns 1.15), causal forward 8 warps 1 stage (3.26; 4 warps
# 5.05; register caps 4.2 to 6.6; 32-row tiles 4.6), backward 4 warps (fwd_bwd 3.29; 8 warps
# 3.92; caps slower), causal inference passes (`fmm_probe.py cinf`, causal fwd ms): far-field
# walks 4 warps 2 stages (1.76; 1 stage 2.47, 3 stages 1.88, 8 warps 2.59), band 4 warps
# 2 stages (1 stage 1.75, 3 stages 1.96, 8 warps 1.89), causal backward passes (`fmm_probe.py
# cpass` at f6f3392, backward alone 4.66 ms with every kernel at 4 warps 2 stages, 64 x 64
# tiles): query-side walks (1 stage 5.37, 3 stages 4.62, 8 warps 6.01), key-side walks 3 stages
# (4.59; 1 stage 4.93, 8 warps 5.54), band dq (1 stage 4.60, 8 warps 4.75, 32- or 128-row tiles
# 4.63 to 4.68), band dk/dv 64 keys x 32 queries (4.54; 32 x 32 4.55, 32 x 64 4.59, 128-row
# 4.82 to 4.88, 1 stage 4.60, 8 warps 5.03).
# Other head dims keep the register-count choices of sm_90 builds. The causal chunk count targets
# `CAUSAL_PROGRAMS_PER_SM` programs per SM, capped so the chunk states stay under
# `STATE_MEMORY_FRACTION` of o (the forward's memory target) or `STATE_MEMORY_FLOOR` bytes,
# whichever is more: 9% of a short sequence's o holds too few chunks to fill the GPU (H100,
# N = 8192, B*H = 16: one chunk per head, 16 programs of 128 tiles each, causal fwd 2.59 ms).
_SMALL, _WIDE = KernelConfig(64, 64, 4, 2), KernelConfig(64, 64, 8, 2)
_SMALL1, _WIDE1 = KernelConfig(64, 64, 4, 1), KernelConfig(64, 64, 8, 1)
CONFIGS: dict[str, dict[int, KernelConfig]] = {
    "state": {16: _SMALL, 32: _SMALL, 64: KernelConfig(64, 64, 4, 3), 128: _WIDE},
    "fwd": {16: _SMALL, 32: _SMALL, 64: KernelConfig(64, 64, 4, 1, maxnreg=128), 128: _WIDE},
    "fwd_causal": {16: _SMALL1, 32: _SMALL1, 64: _WIDE1, 128: _WIDE1},
    "bwd_dq": {16: _SMALL, 32: _SMALL, 64: _SMALL, 128: _WIDE},
    "bwd_dkdv": {16: _SMALL, 32: _SMALL, 64: _SMALL, 128: _WIDE},
    "band_causal": {16: _SMALL, 32: _SMALL, 64: _SMALL, 128: _WIDE},
    "far_causal": {16: _SMALL, 32: _SMALL, 64: _SMALL, 128: _WIDE},
    "far_causal_inference": {16: _SMALL, 32: _SMALL, 64: KernelConfig(64, 64, 4, 2, maxnreg=168),
                             128: _WIDE},
    "far_bwd_q": {16: _SMALL, 32: _SMALL, 64: _SMALL, 128: _WIDE},
    "far_bwd_kv": {16: _SMALL, 32: _SMALL, 64: KernelConfig(64, 64, 4, 3), 128: _WIDE},
    "band_bwd_q": {16: _SMALL, 32: _SMALL, 64: _SMALL, 128: _WIDE},
    "band_bwd_kv": {16: _SMALL, 32: _SMALL, 64: KernelConfig(64, 32, 4, 2), 128: _WIDE},
}
# bf16 inputs: far-field products (states, feature maps) in bf16 rather than tf32.
FAR_BF16 = True
# One causal program fills an SM (8 warps, 255 registers): 132 programs on an H100 are one
# wave (at B*H = 16, 8 chunks of 128 tiles: 128 tile steps per SM; the 15 chunks of 2 per SM,
# 240 programs, took two waves of 69).
CAUSAL_PROGRAMS_PER_SM = 1
STATE_PROGRAMS_PER_SM = 4
# Causal inference: one pass per far-field map (one state a program) after a band pass, o
# accumulated in its own dtype; False: the fused walk of band and every map (o rounded once).
CAUSAL_MAP_PASSES = True
# Their far-field walks: chunks for 4 programs per SM (H100 causal fwd 1.76 ms; 2: 1.81, 8: 2.07),
# which the backward walks in groups of two (one wave at two programs per SM). Without grad,
# capped at 168 registers, three programs fit per SM: chunks for one wave of them (1.68 ms
# against 1.73; `probe_walk_caps.log`). The backward would walk those chunks slower.
FAR_PROGRAMS_PER_SM = 4
FAR_INFERENCE_PROGRAMS_PER_SM = 3
# The causal backward's walks (one map each): programs per SM that fit at once.
BWD_PROGRAMS_PER_SM = 2
STATE_MEMORY_FRACTION = 0.09
STATE_MEMORY_FLOOR = 8 * 2**20  # below 9% of o from N = 2^16 on at B*H = 16, D = 64
# The interpreter runs numpy per program: small tiles keep CPU tests fast and walk many tiles.
INTERPRET_CONFIG = KernelConfig(16, 16, 4, 1)


def _config(kind: str, d: int, device: torch.device) -> KernelConfig:
    if device.type != "cuda":
        return INTERPRET_CONFIG
    return CONFIGS[kind][d]


# ---------------------------------------------------------------------------------------------
# Triton helpers
# ---------------------------------------------------------------------------------------------
# The interpreter multiplies bf16 dot operands as raw uint16 bits (triton-lang/triton#11584);
# there they go to fp32 first, which is what the tensor cores compute from bf16 anyway.
_UPCAST_DOTS = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _dot(a, b, acc, DOT_PREC: tl.constexpr):
    if _UPCAST_DOTS:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _phi_prep(x):
    """(e, r) = (exp(-|x|), 1 / (1 + e^2)) in x's dtype: every feature map's transcendentals,
    once per tile, held at input precision (bf16 feeds bf16 matmuls anyway) to save registers."""
    e = tl.exp(-tl.abs(x.to(tl.float32)))
    return e.to(x.dtype), (1.0 / (1.0 + e * e)).to(x.dtype)


@triton.jit
def _phi_grad(x, e, r, which):
    """phi_l(x) and phi_l'(x), fp32, for a run-time l, branch-free from x, e and r
    (`_phi_prep`): elu(x) + 1, elu(-x) + 1, and tanh(x) + 1 = 2r for x >= 0, 2 - 2r below.
    The map loop of a non-causal tile then pays no map's transcendentals twice."""
    x = x.to(tl.float32)
    e = e.to(tl.float32)
    sign = tl.where(which == 1, -1.0, 1.0)
    t = x * sign
    y12 = tl.where(t > 0, 1.0 + t, e)
    dy12 = tl.where(t > 0, 1.0, e) * sign
    r = r.to(tl.float32)
    y3 = tl.where(x >= 0, 2.0 * r, 2.0 - 2.0 * r)
    is3 = which == 2
    return tl.where(is3, y3, y12), tl.where(is3, y3 * (2.0 - y3), dy12)


@triton.jit
def _phi_one(x, which):
    """phi_l(x), fp32, for a run-time l, from x alone: one exp per element, the maps'
    formulas behind a scalar branch (tanh(x) + 1 as 2 / (1 + exp(-2x))), so that a tile holds
    one map's temporaries. `_phi_grad`'s branch-free blend holds every map's: in the causal
    backward's sm_90 builds those made most of the spills."""
    x = x.to(tl.float32)
    if which == 2:
        y = 2.0 / (1.0 + tl.exp(-2.0 * x))
    else:
        t = x * (1.0 - 2.0 * which)  # x, or -x for elu(-x) + 1
        y = tl.where(t > 0, t + 1.0, tl.exp(tl.minimum(t, 0.0)))
    return y


@triton.jit
def _phi_one_grad(x, which):
    """phi_l(x) and phi_l'(x), fp32 (see `_phi_one`)."""
    x = x.to(tl.float32)
    if which == 2:
        y = 2.0 / (1.0 + tl.exp(-2.0 * x))
        dy = y * (2.0 - y)
    else:
        sign = 1.0 - 2.0 * which
        t = x * sign
        e = tl.exp(tl.minimum(t, 0.0))
        y = tl.where(t > 0, t + 1.0, e)
        dy = tl.where(t > 0, 1.0, e) * sign
    return y, dy


@triton.jit
def _mm(x, ref, LOWP: tl.constexpr):
    # Far-field matmul operands: the input dtype for bf16 (range to spare), fp32 otherwise
    # (fp16 could overflow in states summed over N keys).
    if LOWP:
        y = x.to(ref.dtype)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _state_base(P, PZ, bh, slot, n_slots, which, R: tl.constexpr, D: tl.constexpr):
    """Base pointers of state `[bh, slot, which]` of a `[B*H, n_slots, R, D, D]` buffer and
    of its z (`[B*H, n_slots, R, D]`)."""
    idx = (bh * n_slots + slot) * R + which
    return P + idx * D * D, PZ + idx * D


@triton.jit
def _state_ptrs(P, PZ, bh, slot, n_slots, which, R: tl.constexpr, D: tl.constexpr,
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
def _exp_neg_abs(x):
    """exp(-|x|) at x's precision: one exp per element serves every feature map, and bf16
    tiles held across the maps take half the registers of fp32 ones."""
    return tl.exp(-tl.abs(x.to(tl.float32))).to(x.dtype)


@triton.jit
def _phi_map(x, e, L: tl.constexpr):
    """phi_L(x), fp32, from x and e = `_exp_neg_abs(x)`: elu(x) + 1, elu(-x) + 1, and
    tanh(x) + 1 = 2 / (1 + e^2) for x >= 0, 2 - that below."""
    x = x.to(tl.float32)
    e = e.to(tl.float32)
    if L == 0:
        y = tl.where(x > 0, x + 1.0, e)
    elif L == 1:
        y = tl.where(x < 0, 1.0 - x, e)
    else:
        r = 1.0 / (1.0 + e * e)
        y = tl.where(x >= 0, 2.0 * r, 2.0 - 2.0 * r)
    return y


@triton.jit
def _near_fwd(q, K, V, m0, rows, ok, N, bandwidth, right, qk_scale, wn, LSE,
              SAVE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_V: tl.constexpr, D: tl.constexpr, DOT_PREC: tl.constexpr):
    """w_near * Near for one query tile and BLOCK_V value columns (V starts at them):
    window_triton's online softmax over the key tiles that meet the band (masked edge tiles,
    unmasked interior). SAVE stores the log2-domain log-sum-exp for the backward."""
    lo, mid_lo, mid_hi, hi = _query_tile_keys(m0, N, bandwidth, right, BLOCK_M, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # [BLOCK_M, BLOCK_V]
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    acc, m_i, l_i = _window_fwd_inner(acc, m_i, l_i, q, K, V, rows, lo, mid_lo, N, bandwidth,
                                      right, qk_scale, D, BLOCK_N, True, DOT_PREC)
    acc, m_i, l_i = _window_fwd_inner(acc, m_i, l_i, q, K, V, rows, mid_lo, mid_hi, N,
                                      bandwidth, right, qk_scale, D, BLOCK_N, False, DOT_PREC)
    acc, m_i, l_i = _window_fwd_inner(acc, m_i, l_i, q, K, V, rows, mid_hi, hi, N, bandwidth,
                                      right, qk_scale, D, BLOCK_N, True, DOT_PREC)
    if SAVE:
        tl.store(LSE + rows, m_i + tl.log2(l_i), mask=ok)
    return acc * (wn / l_i)[:, None]


@triton.jit
def _far_apply(out, q, eq, s, z, wf, eps, L: tl.constexpr,
               LOWP: tl.constexpr, DOT_PREC: tl.constexpr):
    """out += w_far Far_L for one query tile from the global state S_L (`[D, out columns]`,
    matmul dtype) and z_L (non-causal)."""
    fq = _phi_map(q, eq, L)
    w = wf / (tl.sum(fq * z[None, :], 1) + eps)
    return _dot(_mm(fq * w[:, None], s, LOWP), s, out, DOT_PREC)


@triton.jit
def _far_causal(out, av, q, eq, k, ek, ok, v_m, s, z, earlier, wf, eps, L: tl.constexpr,
                LOWP: tl.constexpr, DOT_PREC: tl.constexpr):
    """Far_L of one causal tile: the carried prefix state (s, z: fp32, keys before the tile)
    applied to the queries, plus the masked intra-tile product, whose weighted scores are
    summed over L into `av` (one `av @ v` serves every map). Returns the state grown by the
    tile's keys."""
    fq = _phi_map(q, eq, L)
    fk = tl.where(ok[:, None], _phi_map(k, ek, L), 0.0)
    fk_m = _mm(fk, v_m, LOWP)
    # [BLOCK_M, BLOCK_M]
    a = tl.where(earlier, _dot(_mm(fq, v_m, LOWP), tl.trans(fk_m), None, DOT_PREC), 0.0)
    w = wf / (tl.sum(fq * z[None, :], 1) + tl.sum(a, 1) + eps)
    out = _dot(_mm(fq * w[:, None], v_m, LOWP), _mm(s, v_m, LOWP), out, DOT_PREC)
    av += a * w[:, None]
    s = _dot(tl.trans(fk_m), v_m, s, DOT_PREC)
    return out, av, s, z + tl.sum(fk, 0)


@triton.jit
def _far_bwd_q(dq, dfar, q, eq, rq, do, wf, rows, N, SP, ZP, eps, DEN, DDEN, which,
               LOWP: tl.constexpr, DOT_PREC: tl.constexpr):
    """Non-causal far term l of dq for one query tile from the global state at SP, ZP. Also
    adds dO . Far_l to the rows' `dfar` (their share of dL/dw_far) and stores den_l and
    dL/d den_l per row.

    With Far_l = num / den: dnum = w_far dO / den and dden = -w_far (dO . Far_l) / den.
    num = phi(q) S, so with G = dO S^T: dO . num = phi(q) . G and dphi(q) = (w_far / den) G +
    dden z: num itself is never formed (H100 dq kernel: 1.24 ms with the products num and
    dnum S^T)."""
    s_m = _mm(tl.load(SP), q, LOWP)
    z = tl.load(ZP)
    # G = dO S^T, [BLOCK_M, D]: after phi_l' (before it, the backward took 2.00 ms instead of
    # 1.90 on the H100)
    fq, dphi = _phi_grad(q, eq, rq, which)
    den = tl.sum(fq * z[None, :], 1) + eps
    g = _dot(_mm(do, q, LOWP), tl.trans(s_m), None, DOT_PREC)
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
    u_m = _mm(tl.load(UP), v, LOWP)
    uz = tl.load(UZP)
    fk, dphi = _phi_grad(k, ek, rk, which)
    # [BLOCK_M, D]
    dfk = _dot(_mm(v, v, LOWP), tl.trans(u_m), None, DOT_PREC) + uz[None, :]
    dv = _dot(_mm(fk, v, LOWP), u_m, dv, DOT_PREC)
    return dk + dfk * dphi, dv


@triton.jit
def _near_bwd_scores(q, do, lse, scale, K, V, start, rows, ok, hi, bandwidth, right, qk_scale,
                     BLOCK_N: tl.constexpr, D: tl.constexpr, DOT_PREC: tl.constexpr):
    """One key tile of a query tile's band: P (recomputed from the log2-domain log-sum-exp,
    times the row's `scale`; `[BLOCK_M, BLOCK_N]`), dO . v_j for those keys and the keys."""
    cols = start + tl.arange(0, BLOCK_N)
    # [BLOCK_N, D]
    band = cols[:, None] * D + tl.arange(0, D)[None, :]
    kb = tl.load(K + band, mask=cols[:, None] < hi, other=0.0)
    vb = tl.load(V + band, mask=cols[:, None] < hi, other=0.0)
    # [BLOCK_M, BLOCK_N]
    sc = _dot(q, tl.trans(kb), None, DOT_PREC) * qk_scale
    rel = cols[None, :] - rows[:, None]
    keep = (rel >= -bandwidth) & (rel <= right) & (cols < hi)[None, :] & ok[:, None]
    p = tl.exp2(tl.where(keep, sc - lse[:, None], float("-inf"))) * scale[:, None]
    dov = _dot(do, tl.trans(vb), None, DOT_PREC)
    return p, dov, kb


@triton.jit
def _near_bwd_q(dq, q, do, lse, K, V, m0, rows, ok, N, bandwidth, right, qk_scale,
                sm_scale, wn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                DOT_PREC: tl.constexpr):
    """The band's share of dq for one query tile, added to dq, in two walks over the key tiles
    that meet the band. The first sums, per row in fp32, sum_j P_ij and dO . Near =
    sum_j P_ij (dO_i . v_j), with P from the forward's log-sum-exp. The row sum's reciprocal
    rescales P to what these scores give (the forward's scores can differ in their last bits,
    and at large scores a last bit moves P by more than the gradient's precision; a scale,
    not a corrected log-sum-exp, whose fp32 spacing at large scores is coarser than the
    correction), and the softmax delta w_near dO . Near comes from the band alone, never from
    o minus the far terms (a difference that loses the band's digits when the far field
    dominates o). The second walk adds dS K with dS = P * (w_near dP - delta). Returns dq,
    dO . Near (for dL/dw_near), the delta and the rows' P scale (for the key side)."""
    # [BLOCK_M]: sum_j P_ij and dO . Near, over the band's keys
    psum = tl.zeros([BLOCK_M], dtype=tl.float32)
    dnear = tl.zeros([BLOCK_M], dtype=tl.float32)
    lo = tl.maximum(m0 - bandwidth, 0)
    hi = tl.minimum(m0 + BLOCK_M + right, N)
    one = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        p, dov, _ = _near_bwd_scores(q, do, lse, one, K, V, start, rows, ok, hi, bandwidth,
                                     right, qk_scale, BLOCK_N, D, DOT_PREC)
        psum += tl.sum(p, 1)
        dnear += tl.sum(p * dov, 1)
    scale = 1.0 / tl.where(psum > 0, psum, 1.0)  # rows past N meet no key
    dnear = dnear * scale
    delta = wn * dnear
    for start in range(lo, hi, BLOCK_N):
        p, dov, kb = _near_bwd_scores(q, do, lse, scale, K, V, start, rows, ok, hi, bandwidth,
                                      right, qk_scale, BLOCK_N, D, DOT_PREC)
        ds = p * (dov * wn - delta[:, None]) * sm_scale
        dq = _dot(ds.to(kb.dtype), kb, dq, DOT_PREC)
    return dq, dnear, delta, scale


@triton.jit
def _near_bwd_kv(k, v, Q, DO, LSE, PSCALE, DELTA, n0, cols, ok, N, bandwidth, right,
                 qk_scale, sm_scale, wn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 D: tl.constexpr, DOT_PREC: tl.constexpr):
    """The band's dk, dv of one key tile (fp32): the queries i with i - k <= j <= i + right,
    their P recomputed from the log-sum-exp and the rows' scale (`_near_bwd_q`), and dS from
    the softmax delta."""
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
        lse = tl.load(LSE + rows, mask=rok, other=0.0)
        pscale = tl.load(PSCALE + rows, mask=rok, other=0.0)
        delta = tl.load(DELTA + rows, mask=rok, other=0.0)
        # [BLOCK_M (keys), BLOCK_N (queries)]
        st = _dot(k, tl.trans(qb), None, DOT_PREC) * qk_scale
        rel = cols[:, None] - rows[None, :]
        keep = (rel >= -bandwidth) & (rel <= right) & rok[None, :] & ok[:, None]
        pt = tl.exp2(tl.where(keep, st - lse[None, :], float("-inf"))) * pscale[None, :]
        dv = _dot(pt.to(dob.dtype), dob, dv, DOT_PREC)
        dpt = _dot(v, tl.trans(dob), None, DOT_PREC) * wn
        dst = pt * (dpt - delta[None, :]) * sm_scale
        dk = _dot(dst.to(qb.dtype), qb, dk, DOT_PREC)
    return dk, dv * wn  # dNear = w_near dO


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _state_add(s, z, a, ea, ok, b, WB, WZ, rows, N, wf, L: tl.constexpr,
               WEIGHTED: tl.constexpr, LOWP: tl.constexpr, DOT_PREC: tl.constexpr):
    """Adds one row tile to state L: phi_L(a)^T b and sum phi_L(a) (see the state kernel).
    z is a `[D, 16]` accumulator of phi_L(a)^T 1 (or ^T dden), every column the same: the row
    sum runs on the tensor cores from the operand the state product has already staged. As a
    reduction across warps per tile it took the H100 state pass from 0.25 to 0.34 ms."""
    fa = tl.where(ok[:, None], _phi_map(a, ea, L), 0.0)
    fa_t = tl.trans(_mm(fa, b, LOWP))
    if WEIGHTED:
        den = tl.load(WB + L * N + rows, mask=ok, other=1.0)
        dden = tl.load(WZ + L * N + rows, mask=ok, other=0.0)
        z = _dot(fa_t, _columns16(dden, fa_t.dtype), z, DOT_PREC)
        # The rows' weights scale phi(a), not b: with b scaled in registers, a split of the
        # value columns (BLOCK_V 32 or 16 at D = 64) gave wrong sums or an illegal address on
        # the H100 (Triton 3.6; compute-sanitizer saw no bad access), the same sums as all
        # columns at once this way, in the same time (fmmformer_triton_logs/fault32.log).
        fa_t = tl.trans(_mm(fa * (wf / den)[:, None], b, LOWP))
        b_m = _mm(b, b, LOWP)
    else:
        z = _dot(fa_t, tl.full([fa.shape[0], 16], 1.0, dtype=fa_t.dtype), z, DOT_PREC)
        b_m = _mm(b, b, LOWP)
    return _dot(fa_t, b_m, s, DOT_PREC), z


@triton.jit
def _columns16(x, dtype):
    """`[len(x), 16]`: x in every column, as a matmul operand that sums rows weighted by x."""
    return (x[:, None] + tl.zeros([x.shape[0], 16], dtype=tl.float32)).to(dtype)


@triton.jit
def _store_state(P, PZ, bh, slot, n_slots, s, z, v0, L: tl.constexpr, R: tl.constexpr,
                 D: tl.constexpr):
    # Every column block stores the same z (a benign duplicate write).
    sp, zp = _state_ptrs(P, PZ, bh, slot, n_slots, L, R, D, v0, s.shape[1])
    tl.store(sp, s)
    tl.store(zp, z)


@triton.jit
def _load_state(P, PZ, bh, slot, n_slots, v0, L: tl.constexpr, R: tl.constexpr,
                D: tl.constexpr, BLOCK_V: tl.constexpr):
    sp, zp = _state_ptrs(P, PZ, bh, slot, n_slots, L, R, D, v0, BLOCK_V)
    return tl.load(sp), tl.load(zp)


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
        ea = _exp_neg_abs(a)
        s0, z0 = _state_add(s0, z0, a, ea, ok, b, WB, WZ, rows, N, wf, MAP0 + 0,
                            WEIGHTED, LOWP, DOT_PREC)
        if R > 1:
            s1, z1 = _state_add(s1, z1, a, ea, ok, b, WB, WZ, rows, N, wf, MAP0 + 1,
                                WEIGHTED, LOWP, DOT_PREC)
        if R > 2:
            s2, z2 = _state_add(s2, z2, a, ea, ok, b, WB, WZ, rows, N, wf, MAP0 + 2,
                                WEIGHTED, LOWP, DOT_PREC)
    _store_state(P, PZ, bh, c, n_chunks, s0, tl.max(z0, 1), v0, 0, R, D)
    if R > 1:
        _store_state(P, PZ, bh, c, n_chunks, s1, tl.max(z1, 1), v0, 1, R, D)
    if R > 2:
        _store_state(P, PZ, bh, c, n_chunks, s2, tl.max(z2, 1), v0, 2, R, D)


@triton.jit
def _fmmformer_scan_kernel(SRC, SRCZ, DST, DSTZ, n_parts, parts_per_chunk, n_chunks,
                           R: tl.constexpr, D: tl.constexpr, BLOCK_P: tl.constexpr,
                           REVERSE: tl.constexpr):
    """Per (head, l, row of the state; row D is z): from the partial states of `n_parts`
    consecutive row ranges (SRC), each chunk's exclusive prefix sum (suffix sum if REVERSE)
    over whole chunks of `parts_per_chunk` parts, into DST. BLOCK_P parts at a time are loaded
    together and scanned with `tl.cumsum`, so the loads of a block wait on nothing (a loop
    carrying one part at a time, storing between loads that may alias, took about 1 us a part
    on the H100: 0.033 ms for 32 chunks). DST may be SRC (one part per chunk: in place; a
    block's parts are all read before any is written)."""
    bh = tl.program_id(0).to(tl.int64)
    which = tl.program_id(1)
    row = tl.program_id(2)
    cols = tl.arange(0, D)
    # Row `row` of every part's state, or (row D) every part's z.
    src, src_z = _state_base(SRC, SRCZ, bh, 0, n_parts, which, R, D)
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
    for start in range(0, n_parts, BLOCK_P):
        step = start + tl.arange(0, BLOCK_P)
        ok = step < n_parts
        part = n_parts - 1 - step if REVERSE else step
        # [BLOCK_P, D], in scan order
        x = tl.load(src + part[:, None] * stride + cols[None, :], mask=ok[:, None], other=0.0)
        excl = carry[None, :] + tl.cumsum(x, 0) - x
        carry += tl.sum(x, 0)
        # A chunk's state is the sum before its first part (after its last, if REVERSE).
        if REVERSE:
            edge = (part % parts_per_chunk == parts_per_chunk - 1) | (part == n_parts - 1)
        else:
            edge = part % parts_per_chunk == 0
        chunk = part // parts_per_chunk
        tl.store(dst + chunk[:, None] * stride + cols[None, :], excl, mask=(ok & edge)[:, None])


@triton.jit
def _bwd_head(Q, K, V, DO, X, Y, LSE, DELTA, DEN, DDEN, WN, WF, bh, N, H,
              R: tl.constexpr, D: tl.constexpr):
    """A backward program's pointers moved to its (batch, head): the `[N, D]` tensors (X, Y are
    the kernel's own: Near and dq, or dk and dv), the per-row statistics and the per-map
    normalizers; and that head's blend weights."""
    off = bh * N * D
    wn = tl.load(WN + bh % H).to(tl.float32)
    wf = tl.load(WF + bh % H).to(tl.float32)
    return (Q + off, K + off, V + off, DO + off, X + off, Y + off, LSE + bh * N, DELTA + bh * N,
            DEN + bh * R * N, DDEN + bh * R * N, wn, wf)


@triton.jit
def _fwd_head(Q, K, V, O, LSE, WN, WF, bh, v0, N, H, D: tl.constexpr):
    """A forward program's pointers moved to its (batch, head) and value columns from v0, and
    that head's blend weights."""
    off = bh * N * D
    wn = tl.load(WN + bh % H).to(tl.float32)
    wf = tl.load(WF + bh % H).to(tl.float32)
    return Q + off, K + off, V + off + v0, O + off + v0, LSE + bh * N, wn, wf


@triton.jit
def _load_states(P, PZ, bh, slot, n_slots, v0, R: tl.constexpr, D: tl.constexpr,
                 BLOCK_V: tl.constexpr):
    """The states of every map in `slot` (those past R repeat map 0), columns from v0."""
    s0, z0 = _load_state(P, PZ, bh, slot, n_slots, v0, 0, R, D, BLOCK_V)
    s1, z1 = s0, z0
    s2, z2 = s0, z0
    if R > 1:
        s1, z1 = _load_state(P, PZ, bh, slot, n_slots, v0, 1, R, D, BLOCK_V)
    if R > 2:
        s2, z2 = _load_state(P, PZ, bh, slot, n_slots, v0, 2, R, D, BLOCK_V)
    return s0, z0, s1, z1, s2, z2


@triton.jit(do_not_specialize=["N", "bandwidth"])
def _fmmformer_fwd_kernel(
    Q, K, V, O, LSE, P, PZ, WN, WF,
    N, H, bandwidth, qk_scale, eps,
    R: tl.constexpr, SAVE: tl.constexpr, LOWP: tl.constexpr, TILES: tl.constexpr,
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
    Q, K, V, O, LSE, wn, wf = _fwd_head(Q, K, V, O, LSE, WN, WF, bh, v0, N, H, D)
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
        out = _near_fwd(q, K, V, m0, rows, ok, N, bandwidth, bandwidth, qk_scale, wn, LSE,
                        SAVE, BLOCK_M, BLOCK_N, BLOCK_V, D, DOT_PREC)
        eq = _exp_neg_abs(q)
        # The far states are loaded (L2 hits) after the band: loaded before it, they held
        # registers through it (measured no faster, and slower under a register cap).
        s0, z0, s1, z1, s2, z2 = _load_states(P, PZ, bh, 0, 1, v0, R, D, BLOCK_V)
        out = _far_apply(out, q, eq, s0, z0, wf, eps, 0, LOWP, DOT_PREC)
        if R > 1:
            out = _far_apply(out, q, eq, s1, z1, wf, eps, 1, LOWP, DOT_PREC)
        if R > 2:
            out = _far_apply(out, q, eq, s2, z2, wf, eps, 2, LOWP, DOT_PREC)
        tl.store(O + tile, out.to(O.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _qkv_tile(Q, K, V, m0, N, BLOCK_M: tl.constexpr, D: tl.constexpr):
    """Rows m0.. of one tile (`[BLOCK_M, D]` offsets and the in-range mask) and its q, k, v."""
    rows = m0 + tl.arange(0, BLOCK_M)
    ok = rows < N
    tile = rows[:, None] * D + tl.arange(0, D)[None, :]
    q = tl.load(Q + tile, mask=ok[:, None], other=0.0)
    k = tl.load(K + tile, mask=ok[:, None], other=0.0)
    v = tl.load(V + tile, mask=ok[:, None], other=0.0)
    return rows, ok, tile, q, k, v


@triton.jit(do_not_specialize=["N", "bandwidth"])
def _fmmformer_fwd_causal_kernel(
    Q, K, V, O, LSE, P, PZ, WN, WF,
    N, H, bandwidth, rows_per_program, qk_scale, eps,
    R: tl.constexpr, SAVE: tl.constexpr, LOWP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Causal: program = (chunk, head). P, PZ (`[B*H, chunks, R, D, D]` fp32) hold each chunk's
    prefix state (left as they are: the backward starts from them); the program carries it in
    registers through its tiles in order. Every value column stays in one program: a split
    (as the non-causal kernel's BLOCK_V) faulted with an illegal address in the H100 build of
    Triton 3.6, which the interpreter does not reproduce."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    n_chunks = tl.num_programs(0)
    Q, K, V, O, LSE, wn, wf = _fwd_head(Q, K, V, O, LSE, WN, WF, bh, 0, N, H, D)
    s0, z0, s1, z1, s2, z2 = _load_states(P, PZ, bh, c, n_chunks, 0, R, D, D)
    row_lo = c * rows_per_program
    row_hi = tl.minimum(row_lo + rows_per_program, N)
    for m0 in range(row_lo, row_hi, BLOCK_M):
        # [BLOCK_M, D]
        rows, ok, tile, q, k, v = _qkv_tile(Q, K, V, m0, N, BLOCK_M, D)
        out = _near_fwd(q, K, V, m0, rows, ok, N, bandwidth, 0, qk_scale, wn, LSE,
                        SAVE, BLOCK_M, BLOCK_N, D, D, DOT_PREC)
        eq = _exp_neg_abs(q)
        ek = _exp_neg_abs(k)
        v_m = _mm(v, v, LOWP)
        earlier = rows[None, :] <= rows[:, None]
        # [BLOCK_M, BLOCK_M]: sum over maps of w_far / den_l * (phi_l(q) phi_l(k)^T, masked)
        av = tl.zeros([BLOCK_M, BLOCK_M], dtype=tl.float32)
        out, av, s0, z0 = _far_causal(out, av, q, eq, k, ek, ok, v_m, s0, z0, earlier, wf,
                                      eps, 0, LOWP, DOT_PREC)
        if R > 1:
            out, av, s1, z1 = _far_causal(out, av, q, eq, k, ek, ok, v_m, s1, z1, earlier,
                                          wf, eps, 1, LOWP, DOT_PREC)
        if R > 2:
            out, av, s2, z2 = _far_causal(out, av, q, eq, k, ek, ok, v_m, s2, z2, earlier,
                                          wf, eps, 2, LOWP, DOT_PREC)
        out = _dot(_mm(av, v_m, LOWP), v_m, out, DOT_PREC)
        tl.store(O + tile, out.to(O.dtype.element_ty), mask=ok[:, None])


@triton.jit(do_not_specialize=["N", "bandwidth"])
def _fmmformer_band_kernel(
    Q, K, V, O, LSE, WN, N, H, bandwidth, qk_scale,
    SAVE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Causal map passes, first pass: o = w_near * Near, one query tile per program (SAVE:
    and the log-sum-exp)."""
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    Q, K, V, O, LSE, wn, _ = _fwd_head(Q, K, V, O, LSE, WN, WN, bh, 0, N, H, D)
    rows = m0 + tl.arange(0, BLOCK_M)
    ok = rows < N
    tile = rows[:, None] * D + tl.arange(0, D)[None, :]
    q = tl.load(Q + tile, mask=ok[:, None], other=0.0)
    out = _near_fwd(q, K, V, m0, rows, ok, N, bandwidth, 0, qk_scale, wn, LSE, SAVE,
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
    Q, K, V, O, _, _, wf = _fwd_head(Q, K, V, O, O, WF, WF, bh, 0, N, H, D)
    s, z = _load_state(P, PZ, bh, c, n_chunks, 0, 0, 1, D, D)
    row_lo = c * rows_per_chunk
    row_hi = tl.minimum(row_lo + rows_per_chunk, N)
    for m0 in range(row_lo, row_hi, BLOCK_M):
        # [BLOCK_M, D]
        rows, ok, tile, q, k, v = _qkv_tile(Q, K, V, m0, N, BLOCK_M, D)
        fq = _phi_map(q, _exp_neg_abs(q), MAP)
        fk = tl.where(ok[:, None], _phi_map(k, _exp_neg_abs(k), MAP), 0.0)
        fq_m = _mm(fq, v, LOWP)
        fk_m = _mm(fk, v, LOWP)
        v_m = _mm(v, v, LOWP)
        # [BLOCK_M, BLOCK_M]
        a = tl.where(rows[None, :] <= rows[:, None],
                     _dot(fq_m, tl.trans(fk_m), None, DOT_PREC), 0.0)
        den = tl.sum(fq * z[None, :], 1) + tl.sum(a, 1) + eps
        num = _dot(_mm(a, v, LOWP), v_m, _dot(fq_m, _mm(s, v, LOWP), None, DOT_PREC),
                   DOT_PREC)
        out = tl.load(O + tile, mask=ok[:, None], other=0.0).to(tl.float32)
        out += num * (wf / den)[:, None]
        tl.store(O + tile, out.to(O.dtype.element_ty), mask=ok[:, None])
        s = _dot(tl.trans(fk_m), v_m, s, DOT_PREC)
        z += tl.sum(fk, 0)


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
    s, z = _load_state(P, PZ, bh, c * state_stride, n_states, 0, MAP, R, D, D)
    u = tl.zeros([D, D], dtype=tl.float32)
    uz = tl.zeros([D], dtype=tl.float32)
    row_lo = c * rows_per_chunk
    row_hi = tl.minimum(row_lo + rows_per_chunk, N)
    for m0 in range(row_lo, row_hi, BLOCK_M):
        # [BLOCK_M, D]
        rows, ok, tile, q, k, v = _qkv_tile(Q, K, V, m0, N, BLOCK_M, D)
        do = tl.load(DO + tile, mask=ok[:, None], other=0.0)
        do_m = _mm(do, q, LOWP)
        fq, dphi = _phi_one_grad(q, MAP)
        fq = tl.where(ok[:, None], fq, 0.0)
        fk = tl.where(ok[:, None], _phi_one(k, MAP), 0.0)
        fk_m = _mm(fk, q, LOWP)
        earlier = rows[None, :] <= rows[:, None]
        # [BLOCK_M, BLOCK_M]
        a = tl.where(earlier, _dot(_mm(fq, q, LOWP), tl.trans(fk_m), None, DOT_PREC), 0.0)
        y = _dot(do, tl.trans(v), None, DOT_PREC)
        # [BLOCK_M, D]
        g = _dot(do_m, tl.trans(_mm(s, q, LOWP)), None, DOT_PREC)
        den = tl.sum(fq * z[None, :], 1) + tl.sum(a, 1) + eps
        fdo = (tl.sum(fq * g, 1) + tl.sum(a * y, 1)) / den
        scale = wf / den
        dden = -scale * fdo
        t = tl.where(earlier, y * scale[:, None] + dden[:, None], 0.0)
        dfq = _dot(_mm(t, q, LOWP), fk_m, g * scale[:, None] + dden[:, None] * z[None, :],
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
        u = _dot(tl.trans(_mm(fq * scale[:, None], q, LOWP)), do_m, u, DOT_PREC)
        uz += tl.sum(fq * dden[:, None], 0)
        s = _dot(tl.trans(fk_m), _mm(v, q, LOWP), s, DOT_PREC)
        z += tl.sum(fk, 0)
    _store_state(U, UZ, bh, c, n_chunks, u, uz, 0, 0, 1, D)


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
    u, uz = _load_state(U, UZ, bh, c, n_chunks, 0, 0, 1, D, D)
    row_lo = c * rows_per_chunk
    steps = tl.cdiv(tl.minimum(row_lo + rows_per_chunk, N) - row_lo, BLOCK_M)
    for it in range(0, steps):
        # [BLOCK_M, D]
        cols, ok, tile, q, k, v = _qkv_tile(Q, K, V, row_lo + (steps - 1 - it) * BLOCK_M, N,
                                            BLOCK_M, D)
        do = tl.load(DO + tile, mask=ok[:, None], other=0.0)
        den = tl.load(DEN + cols, mask=ok, other=1.0)
        dden = tl.load(DDEN + cols, mask=ok, other=0.0)
        scale = wf / den
        fq = tl.where(ok[:, None], _phi_one(q, MAP), 0.0)
        fq_m = _mm(fq, k, LOWP)
        fk, dphi = _phi_one_grad(k, MAP)
        fk_m = _mm(tl.where(ok[:, None], fk, 0.0), k, LOWP)
        u_m = _mm(u, k, LOWP)
        # [BLOCK_M keys j, BLOCK_M queries i]: i >= j
        later = cols[None, :] >= cols[:, None]
        yt = _dot(v, tl.trans(do), None, DOT_PREC)
        t1 = tl.where(later, yt * scale[None, :] + dden[None, :], 0.0)
        dfk = _dot(_mm(t1, k, LOWP), fq_m, _dot(_mm(v, k, LOWP), tl.trans(u_m), None, DOT_PREC),
                   DOT_PREC)
        dk = (dfk + uz[None, :]) * dphi
        t2 = tl.where(later, _dot(fk_m, tl.trans(fq_m), None, DOT_PREC), 0.0)
        dnum_m = _mm(do.to(tl.float32) * scale[:, None], k, LOWP)
        dv = _dot(_mm(t2, k, LOWP), dnum_m, _dot(fk_m, u_m, None, DOT_PREC), DOT_PREC)
        if not FIRST:
            dk += tl.load(DK + tile, mask=ok[:, None], other=0.0).to(tl.float32)
            dv += tl.load(DV + tile, mask=ok[:, None], other=0.0).to(tl.float32)
        tl.store(DK + tile, dk.to(DK.dtype.element_ty), mask=ok[:, None])
        tl.store(DV + tile, dv.to(DV.dtype.element_ty), mask=ok[:, None])
        u = _dot(tl.trans(fq_m), dnum_m, u, DOT_PREC)
        uz += tl.sum(fq * dden[:, None], 0)


@triton.jit(do_not_specialize=["N", "bandwidth"])
def _fmmformer_band_bwd_q_kernel(
    Q, K, V, DO, LSE, PSCALE, DELTA, DFAR, DQ, DW, WN, WF, N, H, bandwidth, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Causal backward map passes, after the far-field maps': the band's share added to dq,
    one query tile per program. Stores the band's softmax delta (w_near dO . Near, from the
    band alone) and the rows' P scale (DELTA, PSCALE; see `_near_bwd_q`), and per-program
    partial sums of dL/dw_near and dL/dw_far (DW `[2, B*H, programs]`; the far field's from
    DFAR, the maps' sum of dO . Far_l)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    Q, K, V, DO, DQ, _, LSE, DELTA, DFAR, _, wn, _ = _bwd_head(
        Q, K, V, DO, DQ, DQ, LSE, DELTA, DFAR, DFAR, WN, WF, bh, N, H, 1, D)
    m0 = pid * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    ok = rows < N
    tile = rows[:, None] * D + tl.arange(0, D)[None, :]
    # [BLOCK_M, D]
    q = tl.load(Q + tile, mask=ok[:, None], other=0.0)
    do = tl.load(DO + tile, mask=ok[:, None], other=0.0)
    lse = tl.load(LSE + rows, mask=ok, other=0.0)
    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    dq, dnear, delta, pscale = _near_bwd_q(dq, q, do, lse, K, V, m0, rows, ok, N, bandwidth,
                                           0, qk_scale, sm_scale, wn, BLOCK_M, BLOCK_N, D,
                                           DOT_PREC)
    tl.store(DELTA + rows, delta, mask=ok)
    tl.store(PSCALE + bh * N + rows, pscale, mask=ok)
    dfar = tl.load(DFAR + rows, mask=ok, other=0.0)
    dq += tl.load(DQ + tile, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(DQ + tile, dq.to(DQ.dtype.element_ty), mask=ok[:, None])
    part = bh * tl.num_programs(0) + pid
    tl.store(DW + part, tl.sum(dnear, 0))
    tl.store(DW + tl.num_programs(1) * tl.num_programs(0) + part, tl.sum(dfar, 0))


@triton.jit(do_not_specialize=["N", "bandwidth"])
def _fmmformer_band_bwd_kv_kernel(
    Q, K, V, DO, LSE, PSCALE, DELTA, DK, DV, WN, N, H, bandwidth, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Causal backward map passes, last: the band's dk, dv added to the far field's, one key
    tile per program."""
    n0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    Q, K, V, DO, DK, DV, LSE, DELTA, _, _, wn, _ = _bwd_head(
        Q, K, V, DO, DK, DV, LSE, DELTA, LSE, LSE, WN, WN, bh, N, H, 1, D)
    cols = n0 + tl.arange(0, BLOCK_M)
    ok = cols < N
    tile = cols[:, None] * D + tl.arange(0, D)[None, :]
    # [BLOCK_M, D]
    k = tl.load(K + tile, mask=ok[:, None], other=0.0)
    v = tl.load(V + tile, mask=ok[:, None], other=0.0)
    dk, dv = _near_bwd_kv(k, v, Q, DO, LSE, PSCALE + bh * N, DELTA, n0, cols, ok, N,
                          bandwidth, 0, qk_scale, sm_scale, wn, BLOCK_M, BLOCK_N, D, DOT_PREC)
    dk += tl.load(DK + tile, mask=ok[:, None], other=0.0).to(tl.float32)
    dv += tl.load(DV + tile, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(DK + tile, dk.to(DK.dtype.element_ty), mask=ok[:, None])
    tl.store(DV + tile, dv.to(DV.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _fmmformer_bwd_dq_kernel(
    Q, K, V, DO, LSE, PSCALE, DELTA, DEN, DDEN, DQ, DW, P, PZ, WN, WF,
    N, H, bandwidth, rows_per_program, qk_scale, sm_scale, eps,
    R: tl.constexpr, LOWP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Non-causal dq (far field, then band), per-row far normalizers and their gradients, the
    softmax delta, and per-program partial sums of dL/dw_near and dL/dw_far, from the global
    states (P, PZ: `[B*H, 1, R, D, D]` in the matmul dtype, `[B*H, 1, R, D]` fp32).

    The band's softmax delta w_near dO . Near is summed from the band's P and dO V^T (see
    `_near_bwd_q`; stored with the rows' P scale in DELTA, PSCALE), as is
    dL/dw_near = dO . Near: the forward keeps no Near, and nothing is divided by w_near."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    Q, K, V, DO, DQ, _, LSE, DELTA, DEN, DDEN, wn, wf = _bwd_head(
        Q, K, V, DO, DQ, DQ, LSE, DELTA, DEN, DDEN, WN, WF, bh, N, H, R, D)
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
        eq, rq = _phi_prep(q)
        # [BLOCK_M]: sum_l dO . Far_l
        dfar = tl.zeros([BLOCK_M], dtype=tl.float32)
        for which in range(R):
            sp, zp = _state_ptrs(P, PZ, bh, 0, 1, which, R, D)
            dq, dfar = _far_bwd_q(dq, dfar, q, eq, rq, do, wf, rows, N, sp, zp, eps, DEN, DDEN,
                                  which, LOWP, DOT_PREC)
        dwf += dfar
        lse = tl.load(LSE + rows, mask=ok, other=0.0)
        dq, dnear, delta, pscale = _near_bwd_q(dq, q, do, lse, K, V, m0, rows, ok, N,
                                               bandwidth, bandwidth, qk_scale, sm_scale, wn,
                                               BLOCK_M, BLOCK_N, D, DOT_PREC)
        tl.store(DELTA + rows, delta, mask=ok)
        tl.store(PSCALE + bh * N + rows, pscale, mask=ok)
        dwn += dnear
        tl.store(DQ + tile, dq.to(DQ.dtype.element_ty), mask=ok[:, None])
    # DW: [2, B*H, programs], dL/dw_near partials then dL/dw_far partials
    part = bh * tl.num_programs(0) + pid
    tl.store(DW + part, tl.sum(dwn, 0))
    tl.store(DW + tl.num_programs(1) * tl.num_programs(0) + part, tl.sum(dwf, 0))


@triton.jit
def _fmmformer_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, PSCALE, DELTA, DEN, DDEN, DK, DV, U, UZ, WN, WF,
    N, H, bandwidth, rows_per_program, qk_scale, sm_scale,
    R: tl.constexpr, LOWP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Non-causal dk, dv: band (the queries whose window holds the key), then the far field
    from the global dual states (U, UZ, laid out as the dq kernel's P, PZ)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    Q, K, V, DO, DK, DV, LSE, DELTA, DEN, DDEN, wn, _ = _bwd_head(
        Q, K, V, DO, DK, DV, LSE, DELTA, DEN, DDEN, WN, WF, bh, N, H, R, D)
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
        dk, dv = _near_bwd_kv(k, v, Q, DO, LSE, PSCALE + bh * N, DELTA, n0, cols, ok, N,
                              bandwidth, bandwidth,
                              qk_scale, sm_scale, wn, BLOCK_M, BLOCK_N, D, DOT_PREC)

        ek, rk = _phi_prep(k)
        for which in range(R):
            up, uzp = _state_ptrs(U, UZ, bh, 0, 1, which, R, D)
            dk, dv = _far_bwd_kv(dk, dv, k, ek, rk, v, up, uzp, which, LOWP, DOT_PREC)
        tl.store(DK + tile, dk.to(DK.dtype.element_ty), mask=ok[:, None])
        tl.store(DV + tile, dv.to(DV.dtype.element_ty), mask=ok[:, None])


# ---------------------------------------------------------------------------------------------
# Launch wrappers
# ---------------------------------------------------------------------------------------------
def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every kernel output is allocated here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _chunk_rows(n: int, bh: int, r: int, d: int, block: int, programs: int, budget: float) -> int:
    """Rows per state chunk: at most `programs` programs in all (a whole number of waves when
    that is what fits at once; at least one chunk per head), a multiple of `block`, and few
    enough chunks that their states (`bh * r * d * (d + 1)` floats each) fit in `budget` bytes."""
    tiles = triton.cdiv(n, block)
    cap = max(1, int(budget // (4 * _state_floats(bh, 1, r, d))))
    chunks = max(1, min(tiles, programs // bh, cap))
    return block * triton.cdiv(tiles, chunks)


def _lowp(dtype: torch.dtype) -> bool:
    return FAR_BF16 and dtype == torch.bfloat16


def _dot_prec(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products; half inputs never reach an fp32 x fp32 dot except
    # fp16 far-field products (fp32 operands: fp16 states would overflow), as 3xTF32: one
    # TF32 product rounds to about fp16's own precision, which alone doubles the gradients'
    # error over an fp32-summed reference.
    return {torch.float32: "ieee", torch.float16: "tf32x3"}.get(dtype, "tf32")


def check_inputs(q: torch.Tensor, bandwidth: int, kernels: int,
                 k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> None:
    """Raise ValueError for what the kernels do not support."""
    for t in (k, v):
        if t is not None and (t.shape != q.shape or t.dtype != q.dtype):
            raise ValueError("fmmformer_triton needs q, k, v of one shape and dtype")
    if q.dim() != 4:
        raise ValueError(f"fmmformer_triton needs [B, H, N, D] inputs, got {tuple(q.shape)}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"fmmformer_triton needs head dim in {HEAD_DIMS}, got {q.shape[-1]}")
    if q.dtype not in DTYPES:
        raise ValueError(f"fmmformer_triton needs dtype fp16/bf16/fp32, got {q.dtype}")
    if bandwidth < 0:
        raise ValueError(f"bandwidth must be >= 0, got {bandwidth}")
    if kernels not in (1, 2, 3):
        raise ValueError(f"kernels must be 1, 2 or 3, got {kernels}")


@dataclass
class _Saved:
    """Forward results backward needs."""

    lse: torch.Tensor  # [B*H, N] fp32, log2 domain
    # Non-causal: the global states ([B*H, 1, r, D, D] matmul dtype, [B*H, 1, r, D] fp32).
    # Causal: slot c holds the state of every key before chunk c (its exclusive prefix).
    states: torch.Tensor
    states_z: torch.Tensor
    chunk_rows: int


# The backward's dual-state weights: per-row den_l, dL/d den_l (`[B*H, r, N]` fp32) and w_far.
Weights = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _state_pass(
    a: torch.Tensor,
    b: torch.Tensor,
    r: int,
    causal: bool,
    chunk_rows: int,
    weights: Weights | None = None,
    scratch: torch.Tensor | None = None,
    map0: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """States sum_i phi_l(a_i) b_i^T and sum_i phi_l(a_i) per chunk of `chunk_rows` rows, for
    the maps map0 .. map0 + r - 1 (stored as 0 .. r - 1).

    `weights` = (den, dden, w_far) gives the backward's dual states instead (module docstring).
    Causal: the chunk partials, `[B*H, chunks, r, D, D]` and `[B*H, chunks, r, D]`, fp32.
    Non-causal: their sum, `[B*H, 1, r, D, D]` in the matmul dtype and `[B*H, 1, r, D]` fp32.
    The partials may live in `scratch` (a tensor not yet written, e.g. the output), where
    large enough.
    """
    bsz, h, n, d = a.shape
    bh, dev = bsz * h, a.device
    cfg = _config("state", d, dev)
    lowp = _lowp(a.dtype)
    chunks = triton.cdiv(n, chunk_rows)
    shape, shape_z = (bh, chunks, r, d, d), (bh, chunks, r, d)
    n_s, n_z = _numel(shape), _numel(shape_z)
    if scratch is not None and _fits(scratch, _state_floats(bh, chunks, r, d)):
        flat = scratch.view(-1).view(torch.uint8)[: 4 * (n_s + n_z)].view(torch.float32)
        states, states_z = flat[:n_s].view(shape), flat[n_s:].view(shape_z)
    else:
        states = _empty(shape, torch.float32, dev)
        states_z = _empty(shape_z, torch.float32, dev)
    den, dden, wf = weights if weights is not None else (states, states, states)
    block_v = min(cfg.block_v, d)
    _fmmformer_state_kernel[(chunks, bh, d // block_v)](
        a, b, den, dden, wf, states, states_z,
        n, h, chunk_rows,
        R=r, WEIGHTED=weights is not None, LOWP=lowp, BLOCK=min(cfg.block_m, chunk_rows),
        BLOCK_V=block_v, D=d,
        DOT_PREC=_dot_prec(a.dtype), MAP0=map0, **cfg.launch(),
    )
    if causal:
        return states, states_z
    summed = states.sum(1, keepdim=True).to(a.dtype if lowp else torch.float32)
    return summed, states_z.sum(1, keepdim=True)


def _numel(shape: tuple[int, ...]) -> int:
    return int(torch.Size(shape).numel())


def _state_floats(bh: int, slots: int, r: int, d: int) -> int:
    """fp32 values of `slots` states of every map and head: `[D, D]` plus z `[D]` each."""
    return bh * slots * r * d * (d + 1)


def _fits(scratch: torch.Tensor, n_floats: int) -> bool:
    """Whether `n_floats` fp32 values fit in contiguous `scratch`'s bytes."""
    return scratch.is_contiguous() and 4 * n_floats <= scratch.numel() * scratch.element_size()


def _scan(parts: torch.Tensor, parts_z: torch.Tensor, states: torch.Tensor,
          states_z: torch.Tensor, parts_per_chunk: int, reverse: bool) -> None:
    """Each chunk's exclusive prefix (suffix if `reverse`) of the part states `[B*H, parts, r,
    D, D]` and `[B*H, parts, r, D]` over chunks of `parts_per_chunk` parts, into `states`,
    `states_z` (`[B*H, chunks, r, ...]`; may be the parts themselves at one part a chunk)."""
    bh, n_parts, r, d, _ = parts.shape
    _fmmformer_scan_kernel[(bh, r, d + 1)](
        parts, parts_z, states, states_z, n_parts, parts_per_chunk, states.shape[1],
        R=r, D=d, BLOCK_P=min(64, triton.next_power_of_2(n_parts)), REVERSE=reverse,
        num_warps=4,
    )


def _prefix_states(
    a: torch.Tensor,
    b: torch.Tensor,
    r: int,
    chunk_rows: int,
    scratch: torch.Tensor | None = None,
    parts_per_chunk: int | None = None,
    map0: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal: every chunk's exclusive prefix states of the keys before it,
    `[B*H, chunks, r, D, D]` and `[B*H, chunks, r, D]` fp32 (states as `_state_pass`).

    The state pass runs over `parts_per_chunk` parts of each chunk (default: enough programs
    to fill the GPU, as the non-causal pass; one per chunk when their partials do not fit in
    `scratch`, a tensor not yet written), and a scan sums the parts into the chunk states:
    with one program per SM the causal kernels take few chunks (8 at B*H = 16 on an H100),
    too few programs for the state pass alone."""
    bsz, h, n, d = a.shape
    bh, dev = bsz * h, a.device
    chunks = triton.cdiv(n, chunk_rows)
    if parts_per_chunk is None:
        tiles = chunk_rows // _config("state", d, dev).block_m
        want = max(1, STATE_PROGRAMS_PER_SM * _sm_count(dev) // (bh * chunks))
        parts_per_chunk = 1
        while parts_per_chunk * 2 <= want and tiles % (parts_per_chunk * 2) == 0:
            parts_per_chunk *= 2
        while parts_per_chunk > 1 and not (
            scratch is not None
            and _fits(scratch, _state_floats(bh, chunks * parts_per_chunk, r, d))
        ):
            parts_per_chunk //= 2
    parts, parts_z = _state_pass(a, b, r, True, chunk_rows // parts_per_chunk, None,
                                 scratch if parts_per_chunk > 1 else None, map0)
    if parts_per_chunk == 1:  # in place
        states, states_z = parts, parts_z
    else:
        states = _empty((bh, chunks, r, d, d), torch.float32, dev)
        states_z = _empty((bh, chunks, r, d), torch.float32, dev)
    _scan(parts, parts_z, states, states_z, parts_per_chunk, reverse=False)
    return states, states_z


def _tile_multiple(d: int, device: torch.device, *kinds: str) -> int:
    """The tile height of the kernels `kinds` that walk the same chunks: their largest."""
    return max(_config(kind, d, device).block_m for kind in kinds)


def _causal_chunk_rows(
    n: int, bh: int, r: int, d: int, o_bytes: float, device: torch.device
) -> int:
    # Causal chunks are the fused forward walk's programs and the backward's walks: a multiple
    # of every causal kernel's tile height.
    block = _tile_multiple(d, device, "fwd_causal", "far_bwd_q", "far_bwd_kv")
    programs = CAUSAL_PROGRAMS_PER_SM * _sm_count(device)
    budget = max(STATE_MEMORY_FRACTION * o_bytes, STATE_MEMORY_FLOOR)
    return _chunk_rows(n, bh, r, d, block, programs, budget)


def _state_chunk_rows(
    n: int, bh: int, r: int, d: int, budget: float, device: torch.device
) -> int:
    # Non-causal chunks only spread the state pass over the GPU; their partials take at most
    # `budget` bytes.
    programs = STATE_PROGRAMS_PER_SM * _sm_count(device)
    block = _config("state", d, device).block_m
    return _chunk_rows(n, bh, r, d, block, programs, budget)


def _causal_map_passes(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    wn: torch.Tensor, wf: torch.Tensor, bandwidth: int, r: int, eps: float, o_bytes: float,
    save: bool,
) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """Causal forward into o: the band pass, then per far-field map its chunk prefix states
    (chunks for `FAR_PROGRAMS_PER_SM` programs per SM) and its pass adding w_far Far_l to o.
    Without `save` one map's states live at a time; with it every map's are kept for the
    backward and returned with their chunk rows (and the band pass stores the log-sum-exp)."""
    b, h, n, d = q.shape
    bh, dev = b * h, q.device
    cfg = _config("band_causal", d, dev)
    _fmmformer_band_kernel[(triton.cdiv(n, cfg.block_m), bh)](
        q, k, v, o, lse, wn, n, h, bandwidth, d**-0.5 * LOG2E,
        SAVE=save, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, D=d, DOT_PREC=_dot_prec(q.dtype),
        **cfg.launch(),
    )
    cfg = _config("far_causal" if save else "far_causal_inference", d, dev)
    # Rows a multiple of every causal tile (the backward walks these chunks when saved).
    block = _tile_multiple(d, dev, "far_causal", "far_causal_inference", "far_bwd_q",
                           "far_bwd_kv")
    budget = max(STATE_MEMORY_FRACTION * o_bytes, STATE_MEMORY_FLOOR)
    per_sm = FAR_PROGRAMS_PER_SM if save else FAR_INFERENCE_PROGRAMS_PER_SM
    chunk_rows = _chunk_rows(n, bh, 1, d, block, per_sm * _sm_count(dev), budget)
    chunks = triton.cdiv(n, chunk_rows)
    kept = None
    if save:
        kept = (_empty((bh, chunks, r, d, d), torch.float32, dev),
                _empty((bh, chunks, r, d), torch.float32, dev))
    for m in range(r):
        states, states_z = _prefix_states(k, v, 1, chunk_rows, parts_per_chunk=1, map0=m)
        _fmmformer_far_causal_kernel[(chunks, bh)](
            q, k, v, o, states, states_z, wf, n, h, chunk_rows, eps,
            MAP=m, LOWP=_lowp(q.dtype), BLOCK_M=cfg.block_m, D=d,
            DOT_PREC=_dot_prec(q.dtype), **cfg.launch(),
        )
        if kept is not None:
            kept[0][:, :, m] = states[:, :, 0]
            kept[1][:, :, m] = states_z[:, :, 0]
        del states, states_z
    return (*kept, chunk_rows) if kept is not None else None


def _walk_stride(n_states: int, bh: int, device: torch.device) -> int:
    """Forward chunks per causal backward walk. The walks fit `BWD_PROGRAMS_PER_SM` programs
    per SM (255 registers at 4 warps): consecutive chunks are grouped so that the walks make at
    most one wave (H100, N = 2^16: backward 4.62 ms in groups of two against 4.79 for the
    forward's 32 chunks a head in two waves). A group starts from its first chunk's state."""
    return triton.cdiv(n_states * bh, BWD_PROGRAMS_PER_SM * _sm_count(device))


def _causal_bwd_map_passes(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, saved: _Saved, do: torch.Tensor,
    wn: torch.Tensor, wf: torch.Tensor, bandwidth: int, r: int, eps: float,
) -> tuple[torch.Tensor, ...]:
    """Causal backward in passes, as the forward's: per far-field map a query-side walk
    (dq, den, dL/d den, dO . Far_l and the chunks' dual sums), a suffix scan of those sums,
    and a key-side walk (dk, dv), each over the forward's chunks with one state in registers;
    then the band's dq (with its softmax delta, from the band alone) and dk, dv, added.
    Gradients are accumulated in their own dtype (bf16: rounded four times)."""
    b, h, n, d = q.shape
    bh, dev = b * h, q.device
    lowp, prec = _lowp(q.dtype), _dot_prec(q.dtype)
    stride = _walk_stride(saved.states.shape[1], bh, dev)
    chunks = triton.cdiv(saved.states.shape[1], stride)
    chunk_rows = saved.chunk_rows * stride
    dq, dk, dv = (_empty(q.shape, q.dtype, dev) for _ in range(3))
    # delta and p_scale: the band's softmax delta and its rows' P scale (`_near_bwd_q`)
    den, dden, dfar, delta, p_scale = (_empty((bh, n), torch.float32, dev) for _ in range(5))
    u = _empty((bh, chunks, 1, d, d), torch.float32, dev)
    uz = _empty((bh, chunks, 1, d), torch.float32, dev)
    cfg_q, cfg_k = _config("far_bwd_q", d, dev), _config("far_bwd_kv", d, dev)
    for m in range(r):
        _fmmformer_far_bwd_q_kernel[(chunks, bh)](
            q, k, v, do, dq, dfar, den, dden, saved.states, saved.states_z, u, uz, wf,
            n, h, chunk_rows, stride, saved.states.shape[1], eps,
            MAP=m, R=r, FIRST=m == 0, LOWP=lowp, BLOCK_M=cfg_q.block_m, D=d, DOT_PREC=prec,
            **cfg_q.launch(),
        )
        _scan(u, uz, u, uz, 1, reverse=True)  # in place: the chunks after each chunk
        _fmmformer_far_bwd_kv_kernel[(chunks, bh)](
            q, k, v, do, dk, dv, den, dden, u, uz, wf, n, h, chunk_rows,
            MAP=m, FIRST=m == 0, LOWP=lowp, BLOCK_M=cfg_k.block_m, D=d, DOT_PREC=prec,
            **cfg_k.launch(),
        )
    qk_scale, sm_scale = d**-0.5 * LOG2E, d**-0.5
    cfg = _config("band_bwd_q", d, dev)
    tiles = triton.cdiv(n, cfg.block_m)
    # Per-program partial sums of dL/dw_near and dL/dw_far, reduced below in one launch.
    dw = _empty((2, bh, tiles), torch.float32, dev)
    _fmmformer_band_bwd_q_kernel[(tiles, bh)](
        q, k, v, do, saved.lse, p_scale, delta, dfar, dq, dw, wn, wf,
        n, h, bandwidth, qk_scale, sm_scale,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, D=d, DOT_PREC=prec, **cfg.launch(),
    )
    cfg = _config("band_bwd_kv", d, dev)
    _fmmformer_band_bwd_kv_kernel[(triton.cdiv(n, cfg.block_m), bh)](
        q, k, v, do, saved.lse, p_scale, delta, dk, dv, wn, n, h, bandwidth, qk_scale, sm_scale,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, D=d, DOT_PREC=prec, **cfg.launch(),
    )
    dwn, dwf = dw.view(2, b, h, -1).sum((1, 3))
    return dq, dk, dv, dwn, dwf


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
) -> tuple[torch.Tensor, _Saved | None]:
    """Fused FMMformer forward.

    Args:
        q, k, v: `[B, H, N, D]`, contiguous, fp16/bf16/fp32, D in 16/32/64/128.
        w_near, w_far: `[H]` blend weights.
        bandwidth, kernels, causal, eps: as `fmmformer_reference`.
        save: also return what `fmmformer_bwd` needs (log-sum-exp, Near, the states).
        out: optional preallocated `[B, H, N, D]` output.
    Returns:
        `o` and the saved tensors (None unless `save`).
    """
    check_inputs(q, bandwidth, kernels, k, v)
    b, h, n, d = q.shape
    dev, r, bh = q.device, kernels, b * h
    cfg = _config("fwd_causal" if causal else "fwd", d, dev)
    o_bytes = q.numel() * q.element_size()
    wn = w_near.detach().to(torch.float32).contiguous()
    wf = w_far.detach().to(torch.float32).contiguous()

    o = out if out is not None else _empty(q.shape, q.dtype, dev)
    lse = _empty((bh, n), torch.float32, dev) if save else o
    common = dict(R=r, SAVE=save, LOWP=_lowp(q.dtype), BLOCK_M=cfg.block_m,
                  BLOCK_N=cfg.block_n, D=d, DOT_PREC=_dot_prec(q.dtype),
                  **cfg.launch())
    qk_scale = d**-0.5 * LOG2E
    if causal and CAUSAL_MAP_PASSES:
        kept = _causal_map_passes(q, k, v, o, lse, wn, wf, bandwidth, r, eps, o_bytes, save)
        return o, (_Saved(lse, *kept) if save else None)
    if causal:
        chunk_rows = _causal_chunk_rows(n, bh, r, d, o_bytes, dev)
        # The parts' partials live in o, written only afterwards.
        states, states_z = _prefix_states(k, v, r, chunk_rows, scratch=o)
        _fmmformer_fwd_causal_kernel[(states.shape[1], bh)](
            q, k, v, o, lse, states, states_z, wn, wf,
            n, h, bandwidth, chunk_rows, qk_scale, eps, **common,
        )
    else:
        # The chunk partials live in o, which the main kernel writes only afterwards: as many
        # chunks as keep the GPU busy, at no memory beyond o.
        chunk_rows = _state_chunk_rows(n, bh, r, d, o_bytes, dev)
        states, states_z = _state_pass(k, v, r, False, chunk_rows, scratch=o)
        tiles, block_v = cfg.tiles_per_program, min(cfg.block_v, d)
        _fmmformer_fwd_kernel[(triton.cdiv(n, cfg.block_m * tiles) * (d // block_v), bh)](
            q, k, v, o, lse, states, states_z, wn, wf,
            n, h, bandwidth, qk_scale, eps, TILES=tiles, BLOCK_V=block_v, **common,
        )
    saved = _Saved(lse, states, states_z, chunk_rows) if save else None
    return o, saved


def fmmformer_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    saved: _Saved,
    do: torch.Tensor,
    w_near: torch.Tensor,
    w_far: torch.Tensor,
    bandwidth: int,
    kernels: int,
    causal: bool,
    eps: float = EPS,
) -> tuple[torch.Tensor, ...]:
    """Fused FMMformer backward from `fmmformer_fwd(..., save=True)`.

    Returns `dq, dk, dv` (like q) and `dw_near, dw_far` (`[H]`, fp32)."""
    b, h, n, d = q.shape
    dev, r, bh = q.device, kernels, b * h
    do = do.contiguous()
    wn = w_near.detach().to(torch.float32).contiguous()
    wf = w_far.detach().to(torch.float32).contiguous()
    if causal:
        return _causal_bwd_map_passes(q, k, v, saved, do, wn, wf, bandwidth, r, eps)
    lowp, prec = _lowp(q.dtype), _dot_prec(q.dtype)
    cfg_q, cfg_k = _config("bwd_dq", d, dev), _config("bwd_dkdv", d, dev)
    qk_scale, sm_scale = d**-0.5 * LOG2E, d**-0.5
    dq = _empty(q.shape, q.dtype, dev)
    dk = _empty(k.shape, k.dtype, dev)
    dv = _empty(v.shape, v.dtype, dev)
    rows_q = cfg_q.block_m * cfg_q.tiles_per_program
    rows_k = cfg_k.block_m * cfg_k.tiles_per_program

    delta = _empty((bh, n), torch.float32, dev)
    p_scale = _empty((bh, n), torch.float32, dev)  # the band's P scale, from the dq kernel
    den = _empty((bh, r, n), torch.float32, dev)
    dden = _empty((bh, r, n), torch.float32, dev)
    grid_q = (triton.cdiv(n, rows_q), bh)
    # Per-program partial sums of dL/dw_near and dL/dw_far, reduced below in one launch.
    dw = _empty((2, bh, grid_q[0]), torch.float32, dev)
    _fmmformer_bwd_dq_kernel[grid_q](
        q, k, v, do, saved.lse, p_scale, delta, den, dden, dq, dw, saved.states,
        saved.states_z, wn, wf, n, h, bandwidth, rows_q, qk_scale, sm_scale, eps,
        R=r, LOWP=lowp, BLOCK_M=cfg_q.block_m, BLOCK_N=cfg_q.block_n, D=d,
        DOT_PREC=prec, **cfg_q.launch(),
    )

    # Dual states: U_l = sum_i phi_l(q_i) (w_far dO_i / den_i)^T, u_l = sum_i phi_l(q_i) dden_i.
    # Their chunk partials live in dk, written only afterwards (as the forward's in o): as
    # many chunks as keep the GPU busy, at no extra memory, whatever N.
    chunk_rows = _state_chunk_rows(n, bh, r, d, dk.numel() * dk.element_size(), dev)
    u, uz = _state_pass(q, do, r, False, chunk_rows, weights=(den, dden, wf), scratch=dk)
    grid_k = (triton.cdiv(n, rows_k), bh)
    _fmmformer_bwd_dkdv_kernel[grid_k](
        q, k, v, do, saved.lse, p_scale, delta, den, dden, dk, dv, u, uz, wn, wf,
        n, h, bandwidth, rows_k, qk_scale, sm_scale,
        R=r, LOWP=lowp, BLOCK_M=cfg_k.block_m, BLOCK_N=cfg_k.block_n, D=d,
        DOT_PREC=prec, **cfg_k.launch(),
    )
    dwn, dwf = dw.view(2, b, h, -1).sum((1, 3))
    return dq, dk, dv, dwn, dwf


# ---------------------------------------------------------------------------------------------
# Autograd and public function
# ---------------------------------------------------------------------------------------------
class _FMMformerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, w_near, w_far, bandwidth, kernels, causal, eps):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, saved = fmmformer_fwd(q, k, v, w_near, w_far, bandwidth, kernels, causal, eps, save=True)
        ctx.save_for_backward(
            q, k, v, w_near, w_far, saved.lse, saved.states, saved.states_z
        )
        ctx.args = (bandwidth, kernels, causal, eps, saved.chunk_rows)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, w_near, w_far, lse, states, states_z = ctx.saved_tensors
        bandwidth, kernels, causal, eps, chunk_rows = ctx.args
        saved = _Saved(lse, states, states_z, chunk_rows)
        dq, dk, dv, dwn, dwf = fmmformer_bwd(
            q, k, v, saved, do, w_near, w_far, bandwidth, kernels, causal, eps
        )
        return dq, dk, dv, dwn.to(w_near.dtype), dwf.to(w_far.dtype), None, None, None, None


def fmmformer_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w_near: torch.Tensor,
    w_far: torch.Tensor,
    *,
    bandwidth: int,
    kernels: int,
    causal: bool,
    eps: float = EPS,
) -> torch.Tensor:
    """FMMformer attention through the fused Triton kernels (same signature as
    `fmmformer_reference`, usable as `FMMformerAttention(impl=...)`).

    Args:
        q, k, v: `[B, H, N, D]`, fp16/bf16/fp32, D in 16/32/64/128, any N.
        w_near, w_far: `[H]` near and far weights (already activated).
        bandwidth: near-field band k >= 0.
        kernels: far-field rank r in 1..3 (phi_1..phi_r: elu+1, elu(-x)+1, tanh+1).
        causal: causal band and prefix far field.
        eps: far-field normalizer epsilon.
    Returns:
        `o`, `[B, H, N, D]` like q; differentiable in q, k, v, w_near and w_far.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, w_near, w_far)):
        return _FMMformerFunction.apply(q, k, v, w_near, w_far, bandwidth, kernels, causal, eps)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return fmmformer_fwd(q, k, v, w_near, w_far, bandwidth, kernels, causal, eps)[0]


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------
def check_fmm_triton(shape: Shape, params: dict) -> str | None:
    if shape.head_dim not in HEAD_DIMS:
        return f"head dim must be one of {HEAD_DIMS}, got {shape.head_dim}"
    if shape.dtype not in DTYPES:
        return f"dtype must be fp16/bf16/fp32, got {shape.dtype}"
    return check_bandwidth(shape, params)


@register_variant(
    "fmmformer_triton",
    family="fmm",
    params=FMM_PARAMS,
    short=FMM_SHORT,
    choices=FMM_CHOICES,
    devices=triton_devices(),
    check=check_fmm_triton,
    reference="fmmformer",
    flops=fmm_flops,
)
def make_fmmformer_triton(shape: Shape, bandwidth: int, kernels: int, blend: str):
    """FMMformer, fused Triton kernels (band + r far terms + blend in one pass), fwd and bwd."""
    return FMMformerAttention(
        shape.heads, bandwidth, kernels, shape.causal, blend, impl=fmmformer_triton
    )
