"""Gradients of every variant with a backward, judged as the accuracy suite judges them:
against the float64 reference, with the same reference math in the same low precision (the
floor) as the bar, never a fixed tolerance that a wrong kernel could pass.

CPU runs put the Triton kernels under the interpreter (bf16 made to round and multiply as on
the GPU, `variants.interpreter`); the full FMMformer grid runs on CUDA.
"""
from __future__ import annotations

import os

import pytest
import torch

from harness.config import BenchConfig, RunOptions
from harness.registry import Shape, VariantConfig, get_variant, register_variant
from harness.registry import unregister_variant
from harness.results import load_results
from harness.runner import Sweep
from harness.trial import Trial, make_inputs
from suites.accuracy import FLOOR_FACTOR, gradient_metrics
from variants import load_builtin_variants
from variants.fmmformer_triton import backward as fmm_backward
from variants.triton_common import LOG2E

load_builtin_variants()

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_kernels = pytest.mark.skipif(not (INTERPRET or CUDA), reason="needs CUDA or the interpreter")
GRAD_METRICS = ("dq", "dk", "dv", "dweights")
IN_PROCESS = RunOptions(isolate=False, case_timeout=0)


def trial_for(name: str, n: int, d: int, dtype: torch.dtype, causal: bool, scale: float = 1.0,
              seed: int = 0, **params) -> Trial:
    """The variant built as the runner builds it, on fresh seeded inputs times `scale`."""
    spec = get_variant(name)
    shape = Shape(1, 2, n, d, causal, dtype)
    config = BenchConfig(device=DEVICE, seed=seed, accuracy_rows=n)
    torch.manual_seed(seed)
    vc = VariantConfig(spec, spec.validate(params))
    fn = vc.build(shape)
    if isinstance(fn, torch.nn.Module):
        fn = fn.to(DEVICE)
        with torch.no_grad():  # blend weights away from their symmetric start
            for p in fn.parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    inputs = tuple(t * scale for t in make_inputs(shape, torch.device(DEVICE), seed))
    return Trial(vc, fn, shape, inputs, torch.device(DEVICE), config)


def assert_within_floor(trial: Trial) -> dict[str, float]:
    metrics, reason = gradient_metrics(trial, rows=None)
    for g in GRAD_METRICS:
        if f"rel_err_{g}_vs_reference" in metrics:
            err = metrics[f"rel_err_{g}_vs_reference"]
            assert err == err, f"{g}: NaN"
    assert metrics["floor_ratio"] <= FLOOR_FACTOR, reason
    return metrics


# (dtype, causal, bandwidth, kernels, N, D, input scale): the defaults causal, a zero-width
# band (the far field is all of o, so the band's softmax delta cannot come from o), inputs x3,
# fp16, a band wider than N.
FMM_CASES = [
    (torch.bfloat16, True, 30, 3, 77, 32, 1.0),
    (torch.bfloat16, False, 0, 1, 77, 32, 1.0),
    (torch.bfloat16, True, 0, 2, 45, 16, 1.0),
    (torch.bfloat16, True, 5, 2, 77, 32, 3.0),
    (torch.bfloat16, False, 1, 3, 45, 16, 3.0),
    (torch.float16, False, 0, 1, 45, 16, 1.0),
    (torch.float16, True, 256, 3, 45, 16, 3.0),
]


@needs_kernels
@pytest.mark.parametrize("case", FMM_CASES,
                         ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_fmmformer_triton_gradients_within_floor(poisoned, case):
    dtype, causal, bandwidth, kernels, n, d, scale = case
    trial = trial_for("fmmformer_triton", n, d, dtype, causal, scale, seed=n + bandwidth,
                      bandwidth=bandwidth, kernels=kernels)
    assert_within_floor(trial)


@needs_kernels
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_fmmformer_triton_fp32_gradients(poisoned, causal, scale):
    """fp32: every gradient within 1e-5 of float64, also at inputs x30 with no band."""
    trial = trial_for("fmmformer_triton", 77, 32, torch.float32, causal, scale, seed=3,
                      bandwidth=0, kernels=1)
    metrics = assert_within_floor(trial)
    for g in GRAD_METRICS:
        assert metrics[f"rel_err_{g}_vs_reference"] < 1e-5, g


@needs_kernels
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fmmformer_triton_backward_keeps_to_its_own_scores(monkeypatch, poisoned, causal):
    """The backward's scores a bit off the forward's (on a GPU another tile shape, or a
    multiply fused into a subtraction, does that) cost nothing: fp32, inputs x30, no band,
    every gradient still within 1e-5 of float64. The band's softmax is recomputed from the
    backward's own scores, so a row with one key has P exactly 1 and dS exactly 0."""
    monkeypatch.setattr(fmm_backward, "LOG2E", LOG2E * (1 + 2**-22))
    trial = trial_for("fmmformer_triton", 77, 32, torch.float32, causal, 30.0, seed=3,
                      bandwidth=0, kernels=1)
    metrics = assert_within_floor(trial)
    for g in GRAD_METRICS:
        assert metrics[f"rel_err_{g}_vs_reference"] < 1e-5, g


# Every other variant whose backward is not its own reference: (name, N, D, params). fma_triton
# at N=77, m=16 has two coarse levels (m=64 would leave it plain softmax), with and without the
# zero-key slots of zero_pad.
KERNELS = [
    ("window_triton", 45, 16, {"bandwidth": 5}),
    ("linear_triton", 45, 16, {}),
    ("fma_triton", 77, 16, {"m": 16}),
    ("fma_triton", 77, 16, {"m": 16, "zero_pad": True}),
    ("softmax_sdpa", 45, 16, {}),
]


@needs_kernels
@pytest.mark.parametrize("dtype,scale", [(torch.bfloat16, 3.0), (torch.float16, 1.0)],
                         ids=["bf16-x3", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name,n,d,params", KERNELS,
                         ids=["-".join([k[0], *(f"{key}={value}" for key, value in k[3].items())])
                              for k in KERNELS])
def test_kernel_gradients_within_floor(poisoned, name, n, d, params, causal, dtype, scale):
    trial = trial_for(name, n, d, dtype, causal, scale, seed=n, **params)
    if get_variant(name).unsupported_reason(trial.shape, trial.variant.params):
        pytest.skip("shape not supported")
    assert_within_floor(trial)


@pytest.mark.parametrize("name", ["linear", "fmmformer"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fp16_references_past_fp16_range(name, causal):
    """phi(q) . sum_j phi(k_j) passes 65504 at N=4096, D=16: output and gradients stay
    finite and within fp16 rounding of float64 (they were 0 or NaN when summed in fp16)."""
    trial = trial_for(name, 4096, 16, torch.float16, causal, seed=1)
    out = trial.forward()
    assert torch.isfinite(out).all() and out.abs().amax() > 0
    metrics, _ = gradient_metrics(trial, rows=None)
    for g in GRAD_METRICS:
        if f"rel_err_{g}_vs_reference" in metrics:
            assert metrics[f"rel_err_{g}_vs_reference"] < 5e-3, g


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("scale", [1.0, 3.0])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kernels", [1, 2, 3])
@pytest.mark.parametrize("bandwidth", [0, 1, 5, 30, 256])
def test_fmmformer_triton_gradient_grid_cuda(poisoned, bandwidth, kernels, causal, scale, dtype):
    trial = trial_for("fmmformer_triton", 333, 64, dtype, causal, scale,
                      seed=bandwidth + kernels, bandwidth=bandwidth, kernels=kernels)
    assert_within_floor(trial)


class _ScaledGradient(torch.autograd.Function):
    """Identity forward; backward scales the gradient (a wrong backward, 3% off)."""

    @staticmethod
    def forward(ctx, q):
        return q.view_as(q)

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.03


@pytest.fixture
def wrong_backward():
    @register_variant("wrong_dq", family="softmax", reference="softmax_naive")
    def make_wrong(shape):
        from variants.softmax import softmax_reference
        return lambda q, k, v: softmax_reference(_ScaledGradient.apply(q), k, v, shape.causal)

    yield "wrong_dq"
    unregister_variant("wrong_dq")


@needs_kernels
@pytest.mark.parametrize("case", [(1, 2, False, torch.bfloat16), (30, 1, True, torch.float16)],
                         ids=["bf16-k1-r2", "fp16-k30-r1-causal"])
def test_weight_gradients_against_the_same_upstream_gradient(poisoned, case):
    """The float64 reference takes dO rounded as the variant does: with the unrounded dO the
    blend weights' gradients (sums over every row) looked 3x their floor at N=333, D=64."""
    bandwidth, kernels, causal, dtype = case
    trial = trial_for("fmmformer_triton", 333, 64, dtype, causal, seed=bandwidth + kernels,
                      bandwidth=bandwidth, kernels=kernels)
    metrics = assert_within_floor(trial)
    assert metrics["rel_err_dweights_vs_reference"] < metrics["rel_err_dweights_floor"] / 10


def test_sweep_flags_gradients_above_floor(tmp_path, wrong_backward):
    """A variant whose dq is 3% off has an exact forward: its gradient row is `inexact`, with
    the reason, in the CSV; the correct one beside it is `ok`."""
    config = BenchConfig(variants=(wrong_backward, "softmax_sdpa"), suites=("accuracy",),
                         modes=("fwd", "fwd_bwd"), seq_lens=(40,), heads=2, head_dim=16,
                         dtype="bf16")
    # in process: the variant is registered in this process only
    df = load_results(Sweep(config, tmp_path / "run", options=IN_PROCESS).run(["test"]))
    ratio = df[df.metric == "floor_ratio"].set_index(["variant", "mode", "causal"])
    for causal in (False, True):
        assert ratio.loc[(wrong_backward, "fwd_bwd", causal), "status"] == "inexact"
        assert "dq error" in ratio.loc[(wrong_backward, "fwd_bwd", causal), "reason"]
        assert ratio.loc[(wrong_backward, "fwd", causal), "status"] == "ok"
        assert ratio.loc[("softmax_sdpa", "fwd_bwd", causal), "status"] == "ok"
    grads = df[df.metric.str.startswith("rel_err_d")]
    assert {"rel_err_dq_vs_reference", "rel_err_dq_floor", "rel_err_dv_floor"} <= set(grads.metric)


class _BandOfOne(torch.autograd.Function):
    """A band of width 0 (each row attends to its own key: o = v, dq = dk = 0) whose backward
    leaves seeded noise of size `noise` in dq, as summation order does in a real kernel."""

    @staticmethod
    def forward(ctx, q, k, v, noise):
        ctx.noise = noise
        return v.clone()

    @staticmethod
    def backward(ctx, grad):
        gen = torch.Generator().manual_seed(0)
        dq = torch.randn(grad.shape, generator=gen).to(grad) * ctx.noise
        return dq, torch.zeros_like(grad), grad, None


@pytest.fixture
def band_of_one():
    @register_variant("band_of_one", family="window", reference="window",
                      params={"bandwidth": 0, "noise": 0.0})
    def make(shape, bandwidth, noise):
        return lambda q, k, v: _BandOfOne.apply(q, k, v, noise)

    yield "band_of_one"
    unregister_variant("band_of_one")


def test_a_zero_gradient_is_judged_against_the_size_of_the_gradients(band_of_one):
    """Where the true dq is exactly 0, fp32 noise of 3e-7 an element is `ok` at any size (it was
    judged as an absolute norm, which grows with the element count), and noise of 1e-3 an
    element is still flagged."""
    quiet = trial_for(band_of_one, 1024, 32, torch.float32, False, noise=3e-7)
    metrics = assert_within_floor(quiet)
    assert metrics["rel_err_dq_floor"] == 0.0
    assert metrics["rel_err_dq_vs_reference"] < 1e-6
    loud = trial_for(band_of_one, 1024, 32, torch.float32, False, noise=1e-3)
    metrics, reason = gradient_metrics(loud, rows=None)
    assert metrics["floor_ratio"] > 10 * FLOOR_FACTOR and "dq error" in reason
