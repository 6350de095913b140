"""Triton Fast Multipole Attention against the PyTorch reference and the dense construction.

CPU runs use the Triton interpreter; `pytest -m cuda` runs the GPU cases. Every buffer the
kernels must fill is allocated NaN-filled (the `poisoned` fixture), and every compared tensor
must be finite.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness.registry import Shape, get_variant
from tests.fma_oracles import fma_dense_matrix
from tests.helpers import DEVICES, rel_err
from variants.fma import avgpool_summaries, fma_geometry, fma_reference
from variants.fma_triton import LaunchConfig, fma_config, fma_fwd, fma_plan, fma_triton
from variants.fma_triton.plan import pool_table
from variants.fma_triton.pool import pool
from variants.softmax import softmax_reference
# fp32 runs exact fp32 dots; the coarse gradients are fp32 atomics (order varies).
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def poison(poisoned):
    """Outputs and scratch buffers start as NaN: anything left unwritten shows up."""


def inputs(n: int, d: int, dtype: torch.dtype, device: str, seed: int, heads: int = 1):
    """q, k, v, do in `dtype` on `device`, and float64 copies of the same (rounded) values."""
    gen = torch.Generator().manual_seed(seed)
    low = [torch.randn(1, heads, n, d, generator=gen) for _ in range(4)]
    low = [t.to(device=device, dtype=dtype) for t in low]
    return low, [t.double() for t in low]


def run(fn, q, k, v, do, params=()):
    """Output and gradients of q, k, v (and of `params`) for upstream gradient `do`."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v)
    return (o, *torch.autograd.grad(o, (q, k, v, *params), do))


def assert_close(got, want, tol, names=("o", "dq", "dk", "dv")):
    for name, x, y in zip(names, got, want):
        err = rel_err(x, y)
        assert err < tol, f"{name}: rel err {err:.2e}"


CASES = [  # n, d, m, p, causal, scale_attn, zero_pad, block_m (None: default tile)
    (77, 16, 16, 2, False, True, False, None),
    (77, 64, 16, 2, True, True, False, None),
    (300, 64, 16, 2, False, True, True, None),
    (300, 16, 16, 2, True, False, True, None),
    (200, 16, 16, 4, False, True, False, 32),  # a tile spans 2 finest blocks
    (200, 16, 16, 2, True, True, True, 32),
    (150, 16, 32, 2, False, False, True, 16),  # a finest block spans 2 tiles
    (150, 16, 32, 2, True, True, False, 16),
    (600, 16, 16, 8, True, True, False, None),  # ragged coarse tables, several coarse tiles
    (600, 16, 16, 8, False, True, False, None),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n, d, m, p, causal, scale_attn, zero_pad, block_m", CASES)
def test_fp32_matches_reference(device, n, d, m, p, causal, scale_attn, zero_pad, block_m):
    opts = dict(m=m, p=p, causal=causal, scale_attn=scale_attn, zero_pad=zero_pad)
    heads = 2 if n == 77 else 1  # B*H > 1 exercises the per-head offsets
    (q, k, v, do), ref_in = inputs(n, d, torch.float32, device, seed=n + d + m, heads=heads)
    cfg = None
    if block_m is not None:
        cfg = LaunchConfig(block_m, min(m, 32), 16, 16, 4, 1, 1, coarse_tile=32 if causal else 64)
    got = run(lambda q, k, v: fma_triton(q, k, v, config=cfg, **opts), q, k, v, do)
    want = run(lambda q, k, v: fma_reference(q, k, v, **opts), *ref_in)
    assert_close(got, want, TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_bf16_matches_reference(device, causal):
    (q, k, v, do), ref_in = inputs(300, 64, torch.bfloat16, device, seed=11)
    opts = dict(m=16, p=2, causal=causal)
    got = run(lambda q, k, v: fma_triton(q, k, v, **opts), q, k, v, do)
    want = run(lambda q, k, v: fma_reference(q, k, v, **opts), *ref_in)
    assert_close(got, want, TOL[torch.bfloat16])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal, zero_pad", [(False, True), (True, False)])
def test_matches_dense_matrix(device, causal, zero_pad):
    """Output and gradients equal `A v` with A built query by query from the SPEC formulas."""
    opts = dict(m=16, p=2, causal=causal, zero_pad=zero_pad)
    (q, k, v, do), ref_in = inputs(77, 16, torch.float32, device, seed=3)
    got = run(lambda q, k, v: fma_triton(q, k, v, **opts), q, k, v, do)
    want = run(lambda q, k, v: fma_dense_matrix(q, k, **opts) @ v, *ref_in)
    assert_close(got, want, TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_no_compression_and_small_n_are_softmax(device, causal):
    """p >= w_l (every coarse token one key, rho = 1) and N <= 2m (near field only) are exact."""
    (q, k, v, do), ref_in = inputs(77, 16, torch.float32, device, seed=5)
    p = fma_geometry(77, 16, 1).n_pad
    got = run(lambda q, k, v: fma_triton(q, k, v, m=16, p=p, causal=causal), q, k, v, do)
    want = run(lambda q, k, v: softmax_reference(q, k, v, causal), *ref_in)
    assert_close(got, want, TOL[torch.float32])
    small = [t[:, :, :20] for t in (q, k, v, do)]
    got = run(lambda q, k, v: fma_triton(q, k, v, m=16, causal=causal), *small)
    want = run(lambda q, k, v: softmax_reference(q, k, v, causal), *(t[:, :, :20] for t in ref_in))
    assert_close(got, want, TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n, causal", [(100, False), (77, True)])
def test_conv_matches_reference_with_weight_grads(device, n, causal):
    """Registered factories: the Triton module and the float64 reference module start with the
    same conv weights and give the same outputs and gradients, conv weights' included."""
    shape = Shape(1, 1, n, 16, causal)
    params = get_variant("fma_triton").validate(dict(m=16, downsample="conv"))
    fast = get_variant("fma_triton").factory(shape, **params).to(device)
    ref = get_variant("fma").factory(shape, **params).double().to(device)
    (q, k, v, do), ref_in = inputs(n, 16, torch.float32, device, seed=7)
    got = run(fast, q, k, v, do, list(fast.parameters()))
    want = run(ref, *ref_in, list(ref.parameters()))
    names = ["o", "dq", "dk", "dv"] + [name for name, _ in fast.named_parameters()]
    assert len(names) == 4 + 4 * fma_geometry(n, 16, 2).levels
    assert_close(got, want, TOL[torch.float32], names)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n, m, p", [(2100, 16, 2), (77, 16, 64), (1000, 32, 8)])
def test_summaries_match_avgpool(device, n, m, p):
    """Pooling kernels: every level's means of the real tokens, including the levels too wide
    for one pooling chunk (2100 -> 7 levels, the top two built by _fma_levels_kernel)."""
    k, v = inputs(n, 16, torch.float32, device, seed=n)[0][:2]
    geo = fma_geometry(n, m, p)
    plan = fma_plan(n, m, p, False, True, False, 32, 64, str(k.device))
    ck, cv = pool(k, v, plan, fma_config(m, False, 16, k.device))
    pad = geo.n_pad - n
    want = avgpool_summaries(*(F.pad(t.double(), (0, 0, 0, pad)) for t in (k, v)), geo)
    assert rel_err(ck, torch.cat([c for c, _ in want], dim=2)) < 1e-6
    assert rel_err(cv, torch.cat([c for _, c in want], dim=2)) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_forward_writes_every_output(device):
    """Preallocated NaN outputs are fully overwritten; the lse is the reference's normalizer."""
    (q, k, v, _), (qd, kd, vd, _) = inputs(77, 16, torch.float32, device, seed=9)
    o = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:-1], float("nan"), device=device)
    fma_fwd(q, k, v, m=16, p=2, out=(o, lse))
    assert rel_err(o, fma_reference(qd, kd, vd, m=16, p=2)) < TOL[torch.float32]
    # With p >= w_l FMA is softmax attention, whose lse is known in closed form.
    p = fma_geometry(77, 16, 1).n_pad
    fma_fwd(q, k, v, m=16, p=p, out=(o, lse))
    want = torch.logsumexp(qd @ kd.transpose(-1, -2) * 16**-0.5, dim=-1)
    assert rel_err(lse, want) < TOL[torch.float32]


@pytest.mark.cuda
@pytest.mark.parametrize("n, causal", [(1000, False), (1000, True), (4099, False), (4099, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_larger(n, causal, dtype):
    (q, k, v, do), ref_in = inputs(n, 64, dtype, "cuda", seed=n, heads=4)
    opts = dict(m=64, p=2, causal=causal)
    got = run(lambda q, k, v: fma_triton(q, k, v, **opts), q, k, v, do)
    want = run(lambda q, k, v: fma_reference(q, k, v, **opts), *ref_in)
    assert_close(got, want, TOL[dtype] * (5 if dtype == torch.float32 else 1))


def test_gpu_launch_config():
    """The GPU defaults the H100 rows were measured with: 64-key tiles, register caps at D <= 64
    only (wider heads would spill), one forward stage when causal, two backward stages at
    D <= 64; coarse tiles 32 wide when causal; the pooling pass's chunks and tiles."""
    gpu = torch.device("cuda")
    for causal, cap, stages in ((False, 96, 2), (True, 128, 1)):
        cfg = fma_config(64, causal, 64, gpu)
        assert (cfg.block_m, cfg.fwd_block_n, cfg.fwd_maxnreg, cfg.fwd_stages) == (
            64, 64, cap, stages)
        assert cfg.bwd_launch("dq") == cfg.bwd_launch("dkdv") == dict(num_stages=2, maxnreg=168)
        assert cfg.coarse_tile == (32 if causal else 64)
        wide = fma_config(64, causal, 128, gpu)
        assert wide.fwd_maxnreg is None and wide.bwd_launch("dq") == dict(num_stages=3)
    assert fma_config(16, False, 64, gpu).fwd_block_n == 16
    cfg = fma_config(64, True, 64, gpu)
    assert (cfg.pool_windows, cfg.pool_block_t, cfg.pool_warps, cfg.pool_stages) == (16, 128, 4, 3)
    plan = fma_plan(65536, 64, 2, True, True, False, 64, cfg.coarse_tile, "cpu")
    # At most 2 groups of p = 2 tokens on each of L = 9 levels: 36 slots, two 32-wide tiles.
    assert (plan.block_c, plan.n_slots, int(plan.used.max())) == (32, 64, 36)
    assert str(cfg) == "q64 fwd_k64s1 bwd_k64s2 dkdv_q64 w4 r128/168/168 c32 pool16x128w4s3"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_module_observes_its_launch_config(device, causal):
    """The registered module reports the launch config of its last call."""
    shape = Shape(1, 1, 40, 16, causal)
    spec = get_variant("fma_triton")
    module = spec.factory(shape, **spec.validate({"m": 16}))
    assert module.observations() == {}
    q = torch.randn(1, 1, 40, 16, device=device)
    with torch.no_grad():
        module(q, q, q)
    cfg = fma_config(16, causal, 16, q.device)
    assert module.observations() == {"launch_config": str(cfg)}
    if device == "cpu":
        assert str(cfg).startswith("q16 fwd_k16s1") and f"c{32 if causal else 64}" in str(cfg)


def test_pool_table_rows():
    """One pooling row per window of every level that fits in a chunk, padded to a power of two."""
    table, levels = pool_table((32, 64, 128, 256, 512, 1024), 512, "cpu")
    lvl, lo, hi = table.tolist()
    assert levels == 5 and len(lvl) == 32
    assert lvl == [0] * 16 + [1] * 8 + [2] * 4 + [3] * 2 + [4, -1]
    assert (lo[17], hi[17], lo[30], hi[30], hi[31]) == (64, 128, 0, 512, 0)


def test_registration_and_checks():
    spec = get_variant("fma_triton")
    assert spec.reference == "fma" and spec.params == get_variant("fma").params
    ok = spec.validate({})
    assert spec.unsupported_reason(Shape(1, 2, 100, 64), ok) is None
    assert "head_dim" in spec.unsupported_reason(Shape(1, 2, 100, 80), ok)
    assert "m in" in spec.unsupported_reason(Shape(1, 2, 100, 64), spec.validate({"m": 8}))
    assert "power of two" in spec.unsupported_reason(Shape(1, 2, 100, 64), spec.validate({"p": 3}))
    with pytest.raises(ValueError, match="head_dim"):
        fma_triton(*(torch.randn(1, 1, 8, 24) for _ in range(3)), m=16)
