"""Fast Multipole Attention, PyTorch reference: level structure, dense construction, options.

`fma_dense_matrix` and `fma_coverage` (`tests/fma_oracles.py`) rebuild the interaction lists
query by query from the SPEC 1.5 formulas; `fma_reference` is vectorized over finest blocks.
They share only the geometry, so agreement checks the lists as well as the arithmetic.
"""
from __future__ import annotations

import pytest
import torch

from harness.registry import RegistryError, Shape, get_variant
from tests.fma_oracles import fma_coverage, fma_dense_matrix, query_slots
from tests.helpers import rel_err
from variants.fma import FMAAttention, fma_flops, fma_geometry, fma_pairs, fma_reference
from variants.softmax import softmax_reference


def inputs(n: int, d: int = 8, heads: int = 2, seed: int = 0, count: int = 4):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, n, d, generator=gen, dtype=torch.float64) for _ in range(count)]


def grads(fn, q, k, v, do):
    """Output and (dq, dk, dv) of `fn` for upstream gradient `do`."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


def test_geometry():
    geo = fma_geometry(77, 4, 2)  # 20 blocks of 4 -> padded to 32 blocks
    assert (geo.n_pad, geo.blocks, geo.levels) == (128, 32, 4)
    assert geo.widths == (4, 8, 16, 32) and geo.widths[-1] == geo.n_pad // 4
    assert geo.slots == (2, 2, 2, 2) and geo.windows == (2, 4, 8, 16)
    assert geo.offsets == (0, 64, 96, 112) and geo.total_rows == 120
    assert geo.valid_counts(4).tolist() == [16, 16, 16, 16, 13, 0, 0, 0]
    assert fma_geometry(64, 64, 2).levels == 0 and fma_geometry(128, 64, 2).levels == 0
    assert fma_geometry(256, 64, 2).levels == 1
    assert fma_geometry(64, 4, 8).slots == (4, 8, 8)  # p_l = min(p, w_l)
    for bad in ((0, 4, 2), (64, 6, 2), (64, 4, 3)):
        with pytest.raises(ValueError):
            fma_geometry(*bad)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n, m, p", [(64, 4, 2), (77, 4, 1), (128, 8, 4), (50, 2, 2)])
def test_lists_partition_the_keys(n, m, p, causal):
    """Every key (every j <= i when causal) is covered exactly once across levels."""
    geo = fma_geometry(n, m, p)
    cover = fma_coverage(n, m, p, causal)
    allowed = torch.ones(geo.n_pad, geo.n_pad, dtype=torch.int64)
    assert torch.equal(cover, allowed.tril() if causal else allowed)
    # Level 0 is exact: blocks b-1..b+1 (causal: b-1 and keys <= i of b).
    i = geo.n_pad // 2 + 1
    near = [j for lvl, j, _ in query_slots(i, geo, causal) if lvl == 0]
    b = i // m
    expect = range((b - 1) * m, (i + 1) if causal else (b + 2) * m)
    assert near == list(expect)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n, m", [(77, 4), (130, 8)])
def test_no_compression_is_softmax(n, m, causal):
    """p >= w_l keeps every key (rho = 1): FMA equals exact attention, dense matrix too."""
    q, k, v, _ = inputs(n)
    exact = softmax_reference(q, k, v, causal)
    p = fma_geometry(n, m, 1).n_pad
    assert rel_err(fma_reference(q, k, v, m=m, p=p, causal=causal), exact) < 1e-12
    dense = fma_dense_matrix(q, k, m=m, p=p, causal=causal)
    assert rel_err(dense @ v, exact) < 1e-12
    # Compressed, it is an approximation: not equal.
    assert rel_err(fma_reference(q, k, v, m=m, p=1, causal=causal), exact) > 1e-3


@pytest.mark.parametrize("n, m", [(20, 16), (32, 16), (5, 4)])
def test_small_n_is_exact(n, m):
    """n_pad <= 2m: no coarse level, the near field covers every key."""
    q, k, v, _ = inputs(n)
    for causal in (False, True):
        out = fma_reference(q, k, v, m=m, p=2, causal=causal)
        assert rel_err(out, softmax_reference(q, k, v, causal)) < 1e-12


CASES = [  # n, m, p, causal, scale_attn, zero_pad
    (77, 4, 2, False, True, False),
    (77, 4, 2, True, True, False),
    (64, 4, 1, False, False, True),
    (64, 4, 2, True, True, True),
    (45, 2, 2, False, True, True),
    (90, 8, 4, True, False, False),
]


@pytest.mark.parametrize("n, m, p, causal, scale_attn, zero_pad", CASES)
def test_reference_matches_dense_matrix(n, m, p, causal, scale_attn, zero_pad):
    """Output and gradients of the block-vectorized reference equal `A v` from the dense build."""
    q, k, v, do = inputs(n, seed=n + m)
    opts = dict(m=m, p=p, causal=causal, scale_attn=scale_attn, zero_pad=zero_pad)
    ref = grads(lambda q, k, v: fma_reference(q, k, v, **opts), q, k, v, do)
    dense = grads(lambda q, k, v: fma_dense_matrix(q, k, **opts) @ v, q, k, v, do)
    for name, x, y in zip(("o", "dq", "dk", "dv"), ref, dense):
        assert rel_err(x, y) < 1e-12, name


def test_options_change_the_result():
    """zero_pad and scale_attn each change the output; weights sum to 1 only without zero_pad."""
    q, k, v, _ = inputs(64, seed=3)
    base = dict(m=4, p=2, causal=False)
    out = fma_reference(q, k, v, **base)
    assert rel_err(fma_reference(q, k, v, **base, zero_pad=True), out) > 1e-3
    assert rel_err(fma_reference(q, k, v, **base, scale_attn=False), out) > 1e-3
    rows = fma_dense_matrix(q, k, **base).sum(-1)
    assert torch.allclose(rows, torch.ones_like(rows))
    rows = fma_dense_matrix(q, k, **base, zero_pad=True).sum(-1)
    assert (rows < 1 - 1e-6).any() and (rows <= 1 + 1e-12).all()


def test_padding_gets_no_weight():
    """N = 77 pads to 128: the dense rows over the 77 real keys sum to 1 (nothing leaks to the
    padding), and a window holding 1 real token summarizes exactly that token."""
    q, k, v, _ = inputs(77, seed=5)
    dense = fma_dense_matrix(q, k, m=4, p=2, causal=False)
    assert torch.allclose(dense.sum(-1), torch.ones(1, 2, 77, dtype=torch.float64))
    geo = fma_geometry(77, 4, 2)
    assert geo.valid_counts(1)[38].item() == 1  # tokens 76, 77: one real


def test_conv_module():
    """Conv weights are deterministic; the averaging kernel reproduces avgpool; gradients reach
    the weights and match finite differences (gradcheck)."""
    n, d = 32, 4
    a = FMAAttention(n, d, m=4, p=2, downsample="conv")
    b = FMAAttention(n, d, m=4, p=2, downsample="conv")
    assert len(a.conv_k) == fma_geometry(n, 4, 2).levels == 2
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    q, k, v, _ = inputs(n, d=d, seed=7)
    a = a.double()
    with torch.no_grad():
        for conv in (*a.conv_k, *a.conv_v):
            s = conv.stride[0]
            conv.weight.copy_(torch.eye(d, dtype=torch.float64)[:, :, None].expand(-1, -1, s) / s)
            conv.bias.zero_()
    assert rel_err(a(q, k, v), fma_reference(q, k, v, m=4, p=2)) < 1e-12

    model = FMAAttention(n, 2, m=4, p=2, causal=True, downsample="conv").double()
    q, k, v, _ = inputs(n, d=2, heads=1, seed=8)
    names = [name for name, _ in model.named_parameters()]

    def f(q, k, v, *params):
        return torch.func.functional_call(model, dict(zip(names, params)), (q, k, v))

    params = [t.detach().clone().requires_grad_() for t in model.parameters()]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(f, (*leaves, *params), eps=1e-6, atol=1e-6, fast_mode=True)
    f(*leaves, *params).square().sum().backward()
    assert all(t.grad.abs().sum() > 0 for t in params)
    with pytest.raises(ValueError, match="built for N=32"):
        model(*(t[:, :, :16] for t in (q, k, v)))


def test_flop_counter_counts_slots():
    """`fma_pairs` equals the slots with real keys, counted query by query from the lists."""
    for n, m, p, causal in ((77, 4, 2, False), (77, 4, 2, True), (64, 8, 1, False)):
        geo = fma_geometry(n, m, p)
        count = 0
        for i in range(n):
            for _, start, stop in query_slots(i, geo, causal):
                count += max(start, 0) < min(stop, n)
        assert fma_pairs(n, m, p, causal) == count
    shape = Shape(1, 16, 65536, 64)
    params = dict(m=64, p=2, downsample="avgpool")
    per_query = fma_flops(shape, params) / (4 * 16 * 65536 * 64)
    assert 3 * 64 < per_query < 3 * 64 + 3 * 2 * 9  # slots outside the sequence are dropped


def test_registration():
    spec = get_variant("fma")
    assert spec.family == "multipole" and spec.params["m"] == 64 and spec.params["p"] == 2
    assert spec.validate({"downsample": "conv"})["downsample"] == "conv"
    with pytest.raises(RegistryError):
        spec.validate({"downsample": "maxpool"})
    shape = Shape(1, 2, 100, 8)
    assert spec.unsupported_reason(shape, spec.validate({})) is None
    assert "power of two" in spec.unsupported_reason(shape, spec.validate({"m": 48}))
    assert "power of two" in spec.unsupported_reason(shape, spec.validate({"p": 3}))
    # The factory passes m, p, scale_attn and zero_pad through: N = 77, m = 4 has four coarse
    # levels, and every option differs from its default.
    opts = dict(m=4, p=1, scale_attn=False, zero_pad=True)
    for causal in (False, True):
        fn = spec.factory(Shape(1, 2, 77, 8, causal), **spec.validate(opts))
        q, k, v, _ = inputs(77, seed=9 + causal)
        assert rel_err(fn(q, k, v), fma_dense_matrix(q, k, causal=causal, **opts) @ v) < 1e-12
    big, conv = Shape(1, 2, 1000, 8), spec.validate({"downsample": "conv"})
    assert spec.flops(big, conv) > spec.flops(big, spec.validate({})) > 0
    assert spec.min_bytes(big, conv) > spec.min_bytes(big, spec.validate({}))
