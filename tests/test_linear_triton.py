"""Triton linear attention against the float64 PyTorch reference: outputs and every gradient.

Runs on CUDA, or on the CPU under TRITON_INTERPRET=1 (small sizes); skipped otherwise.
Every buffer the kernels fill is pre-filled with NaN, so an unwritten element fails.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from harness.registry import Shape, get_variant
from variants import linear_triton as lt
from variants.linear import linear_reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
if not (CUDA or INTERPRET):
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 5e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Outputs and scratch buffers start as NaN: any element a kernel skips shows up."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(lt, "_empty", nan_empty)


@pytest.fixture(autouse=True)
def interpreter_bf16_dot(monkeypatch):
    """The interpreter's tl.dot multiplies bf16 bit patterns as uint16; widen them first."""
    if not INTERPRET:
        return
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def widen(h):
        if h.dtype.scalar == tl.bfloat16:
            data = (h.data.astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(data, tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(x).all(), "non-finite values (unwritten or overflowed)"
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def make_inputs(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(DEVICE, dtype) for _ in range(4)]


def check(b, h, n, d, causal, feature_map, dtype, seed=0, seg_chunks=None):
    """Compare o, dq, dk, dv of the Triton path with the float64 reference."""
    q, k, v, do = make_inputs((b, h, n, d), dtype, seed)
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
def test_fp32_matches_reference(causal, n, d, feature_map):
    check(1, 2, n, d, causal, feature_map, torch.float32)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n, d, dtype", [(77, 64, torch.bfloat16), (300, 16, torch.bfloat16),
                                         (130, 32, torch.float16)])  # fmt: skip
def test_low_precision_matches_reference(causal, n, d, dtype):
    check(1, 2, n, d, causal, "elu", dtype, seed=1)


@pytest.mark.parametrize("causal", [False, True])
def test_head_dim_128_and_batches(causal):
    # D=128 splits the causal forward over two value blocks; B*H=4 heads of odd length.
    check(2, 2, 65, 128, causal, "elu", torch.float32, seed=2)


@pytest.mark.parametrize("causal", [False, True])
def test_segmentation_does_not_change_results(causal):
    # One segment per chunk, uneven segments, and one segment for everything.
    outs = [check(1, 1, 333, 16, causal, "tanh", torch.float32, seed=3, seg_chunks=s)
            for s in (1, 2, 100)]  # fmt: skip
    for o, grads in outs[1:]:
        for x, y in zip((o, *grads), (outs[0][0], *outs[0][1])):
            assert rel_err(x, y) < 5e-5


@pytest.mark.parametrize("causal", [False, True])
def test_autograd_function(causal):
    q, k, v, do = make_inputs((1, 2, 100, 32), torch.float32, seed=4)
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


def test_saved_state_is_small():
    q, k, v, _ = make_inputs((1, 2, 300, 16), torch.float32, seed=5)
    for causal in (False, True):
        _, saved = lt.linear_fwd(q, k, v, causal, seg_chunks=1)
        sizes = [t.numel() for t in (saved.state, saved.z, saved.den) if t is not None]
        # Per-segment D x D states plus O(N) rows: far below one N x D x D tensor.
        assert sum(sizes) < 300 * 16 * 16 / 2, sizes


def test_bad_inputs_raise():
    q, k, v, _ = make_inputs((1, 1, 8, 48), torch.float32, seed=6)
    with pytest.raises(ValueError, match="head_dim"):
        lt.linear_fwd(q, k, v, False)
    q, k, v, _ = make_inputs((1, 1, 8, 16), torch.float32, seed=6)
    with pytest.raises(ValueError, match="feature_map"):
        lt.linear_fwd(q, k, v, False, "relu")


def test_registration():
    spec = get_variant("linear_triton")
    ref = get_variant("linear")
    assert spec.family == "linear" and spec.reference == "linear"
    assert spec.params == ref.params and spec.choices == ref.choices
    assert spec.unavailable_reason(torch.device(DEVICE)) is None
    assert spec.unsupported_reason(Shape(1, 1, 64, 48), spec.params) is not None
    fp64 = Shape(1, 1, 64, 64, dtype=torch.float64)
    assert spec.unsupported_reason(fp64, spec.params) is not None
    shape = Shape(1, 2, 96, 16, causal=True)
    assert spec.unsupported_reason(shape, spec.params) is None
    assert spec.flops(shape, spec.params) == ref.flops(shape, spec.params)
    q, k, v, _ = make_inputs((1, 2, 96, 16), torch.float32, seed=7)
    fn = spec.factory(shape, **spec.params)
    assert rel_err(fn(q, k, v).cpu(), linear_reference(q.cpu().double(), k.cpu().double(),
                                                        v.cpu().double(), True)) < 5e-5  # fmt: skip


@pytest.mark.skipif(not CUDA, reason="CUDA only: sizes too slow for the interpreter")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_long(causal, dtype):
    check(2, 3, 1000, 64, causal, "elu", dtype, seed=8)
    check(1, 4, 4097, 64, causal, "tanh", dtype, seed=9)
    check(1, 2, 2049, 128, causal, "elu_neg", dtype, seed=10)

