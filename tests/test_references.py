"""Every PyTorch reference against an independent dense float64 computation."""
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import band_mask, dense_attention, dense_linear, rand_qkv, rel_err
from variants.fmmformer import FMMformerAttention, fmmformer_reference
from variants.linear import FEATURE_MAPS, linear_reference
from variants.softmax import softmax_reference, softmax_rows_reference
from variants.window import window_reference

SHAPES = [(1, 2, 77, 16), (2, 1, 1000, 64)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_softmax_reference(shape, causal):
    q, k, v = rand_qkv(*shape)
    n = shape[2]
    allowed = band_mask(n, n, causal)
    ref = dense_attention(q, k, v, allowed)
    assert rel_err(softmax_reference(q, k, v, causal), ref) < 1e-12
    rows = torch.tensor([0, 1, n // 2, n - 1])
    assert rel_err(softmax_rows_reference(q, k, v, rows, causal), ref[:, :, rows]) < 1e-12


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bandwidth", [0, 5, 30, 5000])
def test_window_reference(shape, causal, bandwidth):
    q, k, v = rand_qkv(*shape)
    ref = dense_attention(q, k, v, band_mask(shape[2], bandwidth, causal))
    out = window_reference(q, k, v, bandwidth, causal, block=64)
    assert rel_err(out, ref) < 1e-12


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("feature_map", list(FEATURE_MAPS))
def test_linear_reference(shape, causal, feature_map):
    q, k, v = rand_qkv(*shape)
    ref = dense_linear(q, k, v, FEATURE_MAPS[feature_map], causal)
    out = linear_reference(q, k, v, causal, feature_map, chunk=32)
    assert rel_err(out, ref) < 1e-12


def test_feature_maps_match_spec():
    x = torch.linspace(-3, 3, 101, dtype=torch.float64)
    assert torch.allclose(FEATURE_MAPS["elu"](x), F.elu(x) + 1)
    assert torch.allclose(FEATURE_MAPS["elu_neg"](x), F.elu(-x) + 1)
    assert torch.allclose(FEATURE_MAPS["tanh"](x), torch.tanh(x) + 1)  # authors' tanh + 1
    assert all((phi(x) >= 0).all() for phi in FEATURE_MAPS.values())  # normalizer stays positive


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernels", [1, 3])
def test_fmmformer_reference(causal, kernels):
    b, h, n, d, bandwidth = 1, 3, 77, 16, 5
    q, k, v = rand_qkv(b, h, n, d)
    w_near, w_far = torch.rand(h, dtype=torch.float64), torch.rand(h, dtype=torch.float64)
    near = dense_attention(q, k, v, band_mask(n, bandwidth, causal))
    far = sum(dense_linear(q, k, v, FEATURE_MAPS[name], causal)
              for name in list(FEATURE_MAPS)[:kernels])
    ref = w_near.view(1, -1, 1, 1) * near + w_far.view(1, -1, 1, 1) * far
    out = fmmformer_reference(q, k, v, w_near, w_far, bandwidth=bandwidth, kernels=kernels,
                              causal=causal)
    assert rel_err(out, ref) < 1e-12


def test_fmmformer_module_gradients_reach_blend_weights():
    module = FMMformerAttention(heads=2, bandwidth=3, kernels=2, causal=True).double()
    q, k, v = (t.requires_grad_() for t in rand_qkv(1, 2, 40, 16))
    assert torch.equal(torch.sigmoid(module.near_logit), torch.full((2,), 0.5, dtype=torch.float64))
    torch.autograd.gradcheck(lambda a, b, c: module(a, b, c), (q[..., :12, :8], k[..., :12, :8],
                             v[..., :12, :8]), fast_mode=True)
    module(q, k, v).square().sum().backward()
    for t in (q, k, v, module.near_logit, module.far_logit):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def _grads(fn, q, k, v, d_out):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    fn(*leaves).backward(d_out)
    return [t.grad for t in leaves]


@pytest.mark.parametrize("causal", [False, True])
def test_reference_gradients_match_dense(causal):
    """Gradients of the blocked/chunked references equal those of the dense N x N forms."""
    b, h, n, d, bandwidth = 1, 2, 77, 16, 6
    q, k, v = rand_qkv(b, h, n, d)
    d_out = torch.randn(b, h, n, d, dtype=torch.float64)
    mask = band_mask(n, bandwidth, causal)
    pairs = [
        (lambda a, b_, c: window_reference(a, b_, c, bandwidth, causal, block=16),
         lambda a, b_, c: dense_attention(a, b_, c, mask)),
        (lambda a, b_, c: linear_reference(a, b_, c, causal, "tanh", chunk=16),
         lambda a, b_, c: dense_linear(a, b_, c, FEATURE_MAPS["tanh"], causal)),
    ]
    for fast, dense in pairs:
        for got, want in zip(_grads(fast, q, k, v, d_out), _grads(dense, q, k, v, d_out)):
            assert rel_err(got, want) < 1e-10
