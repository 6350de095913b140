"""Triton sliding-window attention against the PyTorch reference: output, logsumexp, gradients.

CPU runs use the Triton interpreter; `pytest -m cuda` runs the GPU cases. Timing:
`benchmarks/variant_times.py window_triton`.
"""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from harness.registry import Shape, get_variant
from tests.helpers import DEVICES, rel_err
from variants.softmax import softmax_reference
from variants.window import window_reference
from variants.window_triton import (
    Tiles,
    WindowConfig,
    key_tile_queries,
    query_tile_keys,
    window_attention_triton,
    window_bwd,
    window_config,
    window_fwd,
)

# fp32 runs exact fp32 dots (interpreter and GPU alike); bf16 rounds P and dS to bf16.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def inputs(shape: tuple[int, ...], dtype: torch.dtype, device: str, seed: int):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(4)]


def reference(q, k, v, do, bandwidth: int, causal: bool):
    """Float64 output, lse and gradients, from the same (already rounded) inputs."""
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    o = window_reference(q, k, v, bandwidth, causal)
    o.backward(do.double())
    # Dense logsumexp is fine at test sizes; the kernels never build it.
    n = q.shape[-2]
    i = torch.arange(n, device=q.device)[:, None]
    j = torch.arange(n, device=q.device)[None, :]
    inside = (j >= i - bandwidth) & (j <= i + (0 if causal else bandwidth))
    scores = (q.detach() @ k.detach().transpose(-1, -2)) * q.shape[-1] ** -0.5
    lse = scores.masked_fill(~inside, float("-inf")).logsumexp(-1)
    return o.detach(), lse, q.grad, k.grad, v.grad


FP32, BF16 = torch.float32, torch.bfloat16
CASES = [  # (N, D, bandwidth, dtype, causal): odd N, bands narrower and wider than the tiles
    *[(77, 16, 5, dt, c) for dt in (FP32, BF16) for c in (False, True)],
    *[(77, 64, 20, dt, c) for dt in (FP32, BF16) for c in (False, True)],
    (300, 16, 100, FP32, False),
    (300, 16, 100, BF16, True),
    (1000, 16, 30, FP32, True),
    (1000, 16, 30, BF16, False),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "n,d,bandwidth,dtype,causal",
    CASES,
    ids=[f"N{n}-D{d}-k{b}-{str(dt)[6:]}-{'causal' if c else 'full'}" for n, d, b, dt, c in CASES],
)
def test_fwd_bwd_match_reference(device, n, d, bandwidth, dtype, causal):
    heads = 1 if n > 500 else 2  # the interpreter's time grows with programs x tiles
    q, k, v, do = inputs((1, heads, n, d), dtype, device, seed=n + d + bandwidth + causal)
    o_ref, lse_ref, dq_ref, dk_ref, dv_ref = reference(q, k, v, do, bandwidth, causal)

    def nan(*shape, dt=dtype):
        return torch.full(shape, float("nan"), dtype=dt, device=device)

    poisoned = (nan(1, heads, n, d), nan(1, heads, n, dt=torch.float32))
    o, lse = window_fwd(q, k, v, bandwidth, causal, out=poisoned)
    poisoned = tuple(nan(1, heads, n, d) for _ in range(3))
    grads = window_bwd(q, k, v, o, lse, do, bandwidth, causal, out=poisoned)

    tol = TOL[dtype]
    assert rel_err(o, o_ref) < tol
    assert rel_err(lse, lse_ref) < 1e-5  # fp32 scores even from bf16 inputs
    for name, g, g_ref in zip("qkv", grads, (dq_ref, dk_ref, dv_ref)):
        assert rel_err(g, g_ref) < tol, f"d{name}"


@triton.jit
def _probe_tiles(
    start_ptr, n_ptr, k_ptr, out_ptr, COUNT,
    CAUSAL: tl.constexpr, KEYS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    start, n, bandwidth = tl.load(start_ptr + i), tl.load(n_ptr + i), tl.load(k_ptr + i)
    if CAUSAL:
        right = 0
    else:
        right = bandwidth
    if KEYS:
        lo, mid_lo, mid_hi, hi = key_tile_queries(start, n, bandwidth, right, BLOCK_M, BLOCK_N)
    else:
        lo, mid_lo, mid_hi, hi = query_tile_keys(start, n, bandwidth, right, BLOCK_M, BLOCK_N)
    tl.store(out_ptr + i, lo)
    tl.store(out_ptr + COUNT + i, mid_lo)
    tl.store(out_ptr + 2 * COUNT + i, mid_hi)
    tl.store(out_ptr + 3 * COUNT + i, hi)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("keys", [False, True], ids=["query_tiles", "key_tiles"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_tile_ranges(device, keys, causal):
    """The band geometry of every kernel, for all tile shapes (CPU), on thousands of (N, k, tile)
    cases: the walk spans exactly the band, and the unmasked tiles lie wholly inside it.

    For query tiles (forward, dQ) the tile walks keys; for key tiles (dK/dV) it walks queries.
    """
    near_tiles = [m + e for m in (16, 32, 64, 128, 256) for e in (-1, 0, 1)]
    ns = [1, 2, 3, 5, 47, 100, 191, *near_tiles]
    ks = [0, 1, 2, 13, 14, 30, 46, 10**6, *near_tiles]
    pairs = [(a, b) for a in (16, 32, 64, 128) for b in (16, 32, 64, 128)]
    if device == "cuda":  # one compile per pair; two pairs check the compiled integer arithmetic
        pairs = [(64, 64), (128, 32)]
    for own, walk in pairs:
        block_m, block_n = (walk, own) if keys else (own, walk)
        cases = [(s, n, b) for n in ns for b in ks for s in range(0, n, own)]
        start, n, bw = torch.tensor(cases, dtype=torch.int32, device=device).T.contiguous()
        bw = torch.minimum(bw, (n - 1).clamp(min=0))  # the launch wrapper clamps k to N - 1
        count = triton.cdiv(len(cases), 1024) * 1024
        pad = lambda t: torch.cat([t, t[:1].expand(count - len(t))])  # noqa: E731
        out = torch.empty(4 * count, dtype=torch.int32, device=device)
        _probe_tiles[(count // 1024,)](
            pad(start), pad(n), pad(bw), out, count, CAUSAL=causal, KEYS=keys,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK=1024,
        )
        lo, mid_lo, mid_hi, hi = out.view(4, count)[:, : len(cases)].long().cpu()
        start, n, bw = start.long().cpu(), n.long().cpu(), bw.long().cpu()
        right = torch.zeros_like(bw) if causal else bw
        last = torch.minimum(start + own, n) - 1  # last valid row (query tile) or key (key tile)
        # Walked indices that meet the band of some valid owned index, clipped to [0, N).
        need_lo = (start - (right if keys else bw)).clamp(min=0)
        need_hi = torch.minimum(last + (bw if keys else right), n - 1) + 1
        tiles_end = lo + (hi - lo + walk - 1) // walk * walk
        where = f"BLOCK_M={block_m} BLOCK_N={block_n}"
        assert (lo == need_lo).all() and (hi == need_hi).all(), f"walk != band range, {where}"
        assert ((mid_lo - lo) % walk == 0).all() and ((mid_hi - lo) % walk == 0).all(), where
        assert ((lo <= mid_lo) & (mid_lo <= mid_hi) & (mid_hi <= tiles_end)).all(), where
        # Unmasked tiles: every walked index valid (< N) and inside the band of every owned one.
        some = mid_hi > mid_lo
        if keys:  # key j is seen by queries j - right <= i <= j + k
            inside = (mid_lo >= last - right) & (mid_hi - 1 <= torch.minimum(start + bw, n - 1))
        else:
            inside = (mid_lo >= last - bw) & (mid_hi - 1 <= torch.minimum(start + right, n - 1))
        assert (inside | ~some).all(), f"unmasked tile crosses the band edge, {where}"


@pytest.mark.parametrize("device", DEVICES)
def test_no_reads_past_n(device):
    """Inputs and lse are views whose storage runs on past row N in NaN: an unmasked read there
    poisons the result (B = H = 1 keeps such views contiguous, so no copy hides them)."""
    cases = [(63, 63, True), (48, 17, False), (129, 64, True), (97, 30, False), (65, 1, True)]
    for n, bandwidth, causal in cases:
        tail = torch.full((1, 1, 140, 16), float("nan"), device=device)
        fresh = inputs((1, 1, n, 16), torch.float32, device, seed=n)
        q, k, v, do = (torch.cat([t, tail], 2)[:, :, :n] for t in fresh)
        assert q.is_contiguous() and torch.isnan(q.as_strided((16,), (1,), n * 16)).all()
        o_ref, lse_ref, *grads_ref = reference(q, k, v, do, bandwidth, causal)
        lse_buf = torch.full((1, 1, n + 140), float("nan"), device=device)
        o, lse = window_fwd(q, k, v, bandwidth, causal, out=(torch.empty_like(q), lse_buf[..., :n]))
        grads = window_bwd(q, k, v, o, lse, do, bandwidth, causal)
        case = f"N={n} k={bandwidth} causal={causal}"
        assert rel_err(o, o_ref) < 1e-5 and rel_err(lse, lse_ref) < 1e-5, case
        for name, g, g_ref in zip("qkv", grads, grads_ref):
            assert rel_err(g, g_ref) < 1e-5, f"d{name} {case}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_autograd_noncontiguous(device, causal):
    """The autograd path on strided views ([B, N, H, D] transposed), gradients included."""
    n, d, bandwidth = 131, 16, 17
    base = inputs((2, n, 3, d), torch.float32, device, seed=7)
    q, k, v, do = (t.transpose(1, 2) for t in base)
    o_ref, _, dq_ref, dk_ref, dv_ref = reference(q, k, v, do, bandwidth, causal)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]  # clone keeps the strides
    assert not any(t.is_contiguous() for t in (*leaves, do))
    o = window_attention_triton(*leaves, bandwidth, causal)
    o.backward(do)
    assert rel_err(o, o_ref) < 1e-5
    for name, leaf, g_ref in zip("qkv", leaves, (dq_ref, dk_ref, dv_ref)):
        assert rel_err(leaf.grad, g_ref) < 1e-5, f"d{name}"


@pytest.mark.parametrize("device", DEVICES)
def test_zero_bandwidth_is_identity(device):
    """k = 0: each token attends only itself, so o = v and no gradient reaches q or k."""
    q, k, v, do = inputs((1, 2, 45, 16), torch.float32, device, seed=3)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    o = window_attention_triton(q, k, v, 0, False)
    o.backward(do)
    torch.testing.assert_close(o, v, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v.grad, do, rtol=1e-6, atol=1e-6)
    assert q.grad.abs().max() < 1e-5 and k.grad.abs().max() < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("n,bandwidth", [(70, 69), (70, 10**9), (1, 0), (1, 5)])
def test_wide_band_is_full_attention(device, causal, n, bandwidth):
    """k >= N - 1 (also absurdly large k) is exact softmax attention; N = 1 works."""
    q, k, v, _ = inputs((1, 2, n, 16), torch.float32, device, seed=n)
    o = window_attention_triton(q, k, v, bandwidth, causal)
    ref = softmax_reference(q.double(), k.double(), v.double(), causal)
    assert rel_err(o, ref) < 1e-5


def test_bad_inputs_raise():
    q = torch.randn(1, 1, 8, 48)
    with pytest.raises(ValueError, match="head_dim"):
        window_fwd(q, q, q, 2, False)
    q = torch.randn(1, 1, 8, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="dtype"):
        window_fwd(q, q, q, 2, False)
    with pytest.raises(ValueError, match="bandwidth"):
        window_fwd(q.float(), q.float(), q.float(), -1, False)


def test_registration():
    spec = get_variant("window_triton")
    window = get_variant("window")
    assert spec.family == "window" and spec.reference == "window"
    assert spec.params == window.params and spec.short == window.short
    assert spec.unsupported_reason(Shape(1, 2, 64, 48), spec.params) is not None
    fp64 = Shape(1, 2, 64, 64, dtype=torch.float64)
    assert spec.unsupported_reason(fp64, spec.params) is not None
    assert spec.unsupported_reason(Shape(1, 2, 64, 64), {"bandwidth": -1}) is not None
    assert spec.unsupported_reason(Shape(1, 2, 64, 64), spec.params) is None
    assert spec.flops(Shape(1, 2, 100, 16), {"bandwidth": 3}) == 4 * 2 * 100 * 7 * 16


@pytest.mark.parametrize("device", DEVICES)
def test_registered_factory_runs(device):
    shape = Shape(1, 2, 77, 16, causal=True)
    fn = get_variant("window_triton").factory(shape, bandwidth=9)
    q, k, v, _ = inputs((1, 2, 77, 16), torch.float32, device, seed=11)
    ref = window_reference(q.double(), k.double(), v.double(), 9, True)
    assert rel_err(fn(q, k, v), ref) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_registered_callable_observes_its_tiles(device, causal):
    """The registered callable reports the tiles its kernels ran with: under the interpreter
    one small, unequal pair per kernel."""
    fn = get_variant("window_triton").factory(Shape(1, 1, 40, 16, causal=causal), bandwidth=5)
    assert fn.observations() == {}
    q, k, v, _ = inputs((1, 1, 40, 16), torch.float32, device, seed=2)
    fn(q, k, v)
    want = str(window_config(q, 5, causal))
    assert fn.observations() == {"launch_config": want}
    if device == "cpu":
        assert want == "fwd=32x16w4s1 dq=32x16w4s1 dkdv=16x32w4s1"


@pytest.mark.parametrize("device", DEVICES)
def test_given_tiles_give_the_same_results(device):
    """Tiles passed in (forward, dQ and dK/dV) rather than chosen: same output and gradients."""
    q, k, v, do = inputs((1, 1, 77, 16), torch.float32, device, seed=5)
    o_ref, _, *grads_ref = reference(q, k, v, do, 9, False)
    config = WindowConfig(Tiles(16, 32), Tiles(16, 16), Tiles(32, 16))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o = window_attention_triton(*leaves, 9, False, config)
    o.backward(do)
    assert rel_err(o, o_ref) < 1e-5
    for name, leaf, g_ref in zip("qkv", leaves, grads_ref):
        assert rel_err(leaf.grad, g_ref) < 1e-5, f"d{name}"
