"""Triton linear attention against the float64 PyTorch reference: outputs and every gradient.

Runs on the CPU under the Triton interpreter (small sizes) and on CUDA (`pytest -m cuda`).
Every buffer the kernels fill is pre-filled with NaN, so an unwritten element fails.
"""
from __future__ import annotations

import pytest
import torch

from harness.registry import Shape, get_variant
from tests.helpers import DEVICES, rel_err
from variants import linear_triton as lt
from variants.linear import linear_reference

TOL = {torch.float32: 5e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def poison(poisoned):
    """Outputs and scratch buffers start as NaN: any element a kernel skips shows up."""


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def make_inputs(shape, dtype, seed, device):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(device, dtype) for _ in range(4)]


def check(device, b, h, n, d, causal, feature_map, dtype, seed=0, seg_chunks=None):
    """Compare o, dq, dk, dv of the Triton path with the float64 reference."""
    q, k, v, do = make_inputs((b, h, n, d), dtype, seed, device)
    o, saved = lt.linear_fwd(q, k, v, causal, feature_map, seg_chunks=seg_chunks)
    grads = lt.linear_bwd(q, k, v, saved, do, causal, feature_map)
    ref_in = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref = linear_reference(*ref_in, causal, feature_map=feature_map)
    ref.backward(do.cpu().double())
    errs = {"o": rel_err(o.cpu(), ref)}
    for name, g, t in zip(("dq", "dk", "dv"), grads, ref_in):
        errs[name] = rel_err(g.cpu(), t.grad)
    assert all(e < TOL[dtype] for e in errs.values()), errs
    return o, grads


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n, d", [(77, 16), (300, 64)])
@pytest.mark.parametrize("feature_map", ["elu", "elu_neg", "tanh"])
def test_fp32_matches_reference(device, causal, n, d, feature_map):
    check(device, 1, 2, n, d, causal, feature_map, torch.float32)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n, d, dtype", [(77, 64, torch.bfloat16), (300, 16, torch.bfloat16),
                                         (130, 32, torch.float16)])  # fmt: skip
def test_low_precision_matches_reference(device, causal, n, d, dtype):
    check(device, 1, 2, n, d, causal, "elu", dtype, seed=1)


@pytest.mark.parametrize("causal", [False, True])
def test_head_dim_128_and_batches(device, causal):
    # D=128 splits the causal forward over two value blocks; B*H=4 heads of odd length.
    check(device, 2, 2, 65, 128, causal, "elu", torch.float32, seed=2)


@pytest.mark.parametrize("causal", [False, True])
def test_segmentation_does_not_change_results(device, causal):
    # One segment per chunk, uneven segments, and one segment for everything.
    outs = [check(device, 1, 1, 333, 16, causal, "tanh", torch.float32, seed=3, seg_chunks=s)
            for s in (1, 2, 100)]  # fmt: skip
    for o, grads in outs[1:]:
        for x, y in zip((o, *grads), (outs[0][0], *outs[0][1])):
            assert rel_err(x, y) < 5e-5


@pytest.mark.parametrize("causal", [False, True])
def test_autograd_function(device, causal):
    q, k, v, do = make_inputs((1, 2, 100, 32), torch.float32, 4, device)
    # Non-contiguous inputs: [B, N, H, D] storage seen as [B, H, N, D].
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v))
    assert not q.is_contiguous()
    o = lt.linear_attention_triton(q, k, v, causal, "elu_neg")
    o.backward(do)
    ref_in = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref = linear_reference(*ref_in, causal, feature_map="elu_neg")
    ref.backward(do.cpu().double())
    assert rel_err(o.detach().cpu(), ref) < 5e-5
    for t, r in zip((q, k, v), ref_in):
        assert rel_err(t.grad.cpu(), r.grad) < 5e-5
    with torch.no_grad():  # no normalizers saved, same output
        assert rel_err(lt.linear_attention_triton(q, k, v, causal, "elu_neg").cpu(), ref) < 5e-5


def test_saved_state_is_small(device):
    q, k, v, _ = make_inputs((1, 2, 300, 16), torch.float32, 5, device)
    for causal in (False, True):
        _, saved = lt.linear_fwd(q, k, v, causal, seg_chunks=1)
        sizes = [t.numel() for t in (saved.state, saved.z, saved.den) if t is not None]
        # Per-segment D x D states plus O(N) rows: far below one N x D x D tensor.
        assert sum(sizes) < 300 * 16 * 16 / 2, sizes


def test_bad_inputs_raise():
    q, k, v, _ = make_inputs((1, 1, 8, 48), torch.float32, 6, "cpu")
    with pytest.raises(ValueError, match="head_dim"):
        lt.linear_fwd(q, k, v, False)
    q, k, v, _ = make_inputs((1, 1, 8, 16), torch.float32, 6, "cpu")
    with pytest.raises(ValueError, match="feature_map"):
        lt.linear_fwd(q, k, v, False, "relu")


def test_registration(device):
    spec = get_variant("linear_triton")
    ref = get_variant("linear")
    assert spec.family == "linear" and spec.reference == "linear"
    assert spec.params == ref.params and spec.choices == ref.choices
    assert spec.unavailable_reason(torch.device(device)) is None
    assert spec.unsupported_reason(Shape(1, 1, 64, 48), spec.params) is not None
    fp64 = Shape(1, 1, 64, 64, dtype=torch.float64)
    assert spec.unsupported_reason(fp64, spec.params) is not None
    shape = Shape(1, 2, 96, 16, causal=True)
    assert spec.unsupported_reason(shape, spec.params) is None
    assert spec.flops(shape, spec.params) == ref.flops(shape, spec.params)
    q, k, v, _ = make_inputs((1, 2, 96, 16), torch.float32, 7, device)
    fn = spec.factory(shape, **spec.params)
    assert rel_err(fn(q, k, v).cpu(), linear_reference(q.cpu().double(), k.cpu().double(),
                                                        v.cpu().double(), True)) < 5e-5  # fmt: skip


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_long(causal, dtype):
    device = "cuda"  # sizes too slow for the interpreter
    check(device, 2, 3, 1000, 64, causal, "elu", dtype, seed=8)
    check(device, 1, 4, 4097, 64, causal, "tanh", dtype, seed=9)
    check(device, 1, 2, 2049, 128, causal, "elu_neg", dtype, seed=10)



def test_launch_config_narrows_wide_operands():
    """The H100 tiles at D = 64 bf16; wider operand rows (D = 128 bf16, fp32 from D = 64)
    take shorter chunks, fewer stages and 8 warps."""
    cpu = torch.device("cpu")
    base = lt.linear_config(64, torch.bfloat16, cpu)
    assert (str(base.state), str(base.bwd_dkdv), str(base.fwd_causal)) == ("64w4s3", "64w8s3",
                                                                          "64w4s2")
    assert str(lt.linear_config(128, torch.bfloat16, cpu).state) == "32w8s2"
    assert str(lt.linear_config(128, torch.float32, cpu).state) == "16w8s1"
    assert base.sm_count == 4 and base.programs_per_sm == 4


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_registered_callable_observes_its_launch_config(device, causal):
    shape = Shape(1, 1, 40, 16, causal=causal)
    fn = get_variant("linear_triton").factory(shape, feature_map="elu")
    assert fn.observations() == {}
    q, k, v, _ = make_inputs((1, 1, 40, 16), torch.float32, 3, device)
    fn(q, k, v)
    want = lt.linear_config(16, torch.float32, q.device).describe(causal)
    assert fn.observations() == {"launch_config": want}
    assert ("fwd_causal=" in want) == causal
    if device == "cpu":
        assert want.endswith("sms=4")
