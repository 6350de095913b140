"""Triton FMMformer against the float64 PyTorch reference: output and every gradient
(q, k, v, w_near, w_far), odd N, causal and not, fp32, bf16 and fp16, with every kernel output
buffer poisoned with NaN first. CPU runs use the Triton interpreter; `pytest -m cuda` runs the
GPU cases. Timing: `benchmarks/fmmformer_parts.py` (the kernels in parts) and
`benchmarks/variant_times.py`.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from harness.registry import Shape, get_variant
from tests.helpers import DEVICES, INTERPRET, nan_empty, rel_err
from variants.fmmformer import FMMformerAttention, fmm_flops, fmmformer_reference
from variants.fmmformer_triton import (
    KernelConfig,
    fmm_config,
    fmmformer_fwd,
    fmmformer_triton,
)
from variants.fmmformer_triton.states import chunk_rows, prefix_states, scan, state_pass
from variants.triton_common import allocate_with

NO_CPU = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1")
CPU_CONFIG = fmm_config(16, torch.device("cpu"))
# fp32: exact fp32 dots (interpreter, and "ieee" on GPU). bf16: bf16 P, dS and far-field
# operands (the interpreter rounds to bf16 and multiplies bf16 as the GPU does:
# `variants.interpreter`). fp16: fp16 P and dS, far-field operands fp32 (tf32 on GPU).
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def inputs(b: int, h: int, n: int, d: int, dtype: torch.dtype, device: str, seed: int):
    """q, k, v, dO (fresh randn) and blend weights in (0, 1), unequal across heads."""
    gen = torch.Generator().manual_seed(seed)
    qkvo = [torch.randn(b, h, n, d, generator=gen).to(device, dtype) for _ in range(4)]
    weights = [torch.sigmoid(torch.randn(h, generator=gen)).to(device) for _ in range(2)]
    return (*qkvo, *weights)


def reference(q, k, v, do, w_near, w_far, bandwidth: int, kernels: int, causal: bool):
    """Float64 output and gradients of q, k, v, w_near, w_far, from the same rounded inputs."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, w_near, w_far)]
    o = fmmformer_reference(*leaves, bandwidth=bandwidth, kernels=kernels, causal=causal)
    o.backward(do.double())
    return o.detach(), *(t.grad for t in leaves)


def run_triton(q, k, v, do, w_near, w_far, bandwidth: int, kernels: int, causal: bool,
               config=None):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, w_near, w_far)]
    o = fmmformer_triton(*leaves, bandwidth=bandwidth, kernels=kernels, causal=causal,
                         config=config)
    o.backward(do)
    return o.detach(), *(t.grad for t in leaves)


def check_all(got, ref, tol: float) -> None:
    for name, g, r in zip(("o", "dq", "dk", "dv", "dw_near", "dw_far"), got, ref):
        assert g.shape == r.shape, name
        assert rel_err(g, r) < tol, f"{name}: rel err {rel_err(g, r):.2e}"


# (N, D, bandwidth, kernels, dtype): odd N, band narrower and wider than a tile, r = 1..3.
CASES = [
    (77, 16, 5, 3, torch.float32),
    (77, 64, 20, 2, torch.float32),
    (211, 16, 30, 3, torch.bfloat16),
    (131, 32, 0, 1, torch.float32),
    (90, 16, 7, 3, torch.float16),
]
CUDA_CASES = [
    (77, 16, 5, 3, torch.float32),
    (1000, 64, 30, 3, torch.bfloat16),
    (300, 128, 45, 2, torch.bfloat16),
    (333, 64, 30, 3, torch.float16),
]


def _case_params(device: str, cases: list, mark) -> list:
    return [pytest.param(device, c, marks=mark, id=f"{device}-N{c[0]}-D{c[1]}-k{c[2]}-r{c[3]}-"
                         + str(c[4]).removeprefix("torch.")) for c in cases]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
    "device,case",
    _case_params("cpu", CASES, NO_CPU) + _case_params("cuda", CUDA_CASES, pytest.mark.cuda),
)
def test_matches_reference(poisoned, device, case, causal):
    n, d, bandwidth, kernels, dtype = case
    q, k, v, do, wn, wf = inputs(1, 2, n, d, dtype, device, seed=n + d + bandwidth + causal)
    ref = reference(q, k, v, do, wn, wf, bandwidth, kernels, causal)
    got = run_triton(q, k, v, do, wn, wf, bandwidth, kernels, causal)
    check_all(got, ref, TOL[dtype])


@pytest.mark.skipif(not INTERPRET, reason="interpreter tile configs")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("sms,tiles_per_program,block_v", [(1, 3, 16), (64, 2, 8)])
def test_tilings_and_chunkings(poisoned, causal, sms, tiles_per_program, block_v):
    """Unequal query and key tiles, several tiles per program, value columns split across
    programs, and causal chunk counts from few chunks per head (1 SM) to one tile per chunk
    (64 SMs): all give the reference."""
    tiles = KernelConfig(16, 32, 4, 1, tiles_per_program, block_v)
    config = dataclasses.replace(
        CPU_CONFIG, **{kind: tiles for kind in ("state", "fwd", "bwd_dq", "bwd_dkdv",
                                                 "band_causal", "far_causal", "far_bwd_q",
                                                 "far_bwd_kv", "band_bwd_q", "band_bwd_kv")},
        sm_count=sms, state_memory_fraction=1.0)
    q, k, v, do, wn, wf = inputs(2, 1, 101, 16, torch.float32, "cpu", seed=5 + causal)
    # Causal: chunks for 4 programs per SM, 2 per head on 1 SM.
    assert chunk_rows(101, 2, 1, 16, 16, config.far_programs_per_sm * sms, 1e9) == (
        64 if sms == 1 else 16)
    ref = reference(q, k, v, do, wn, wf, 7, 3, causal)
    check_all(run_triton(q, k, v, do, wn, wf, 7, 3, causal, config), ref, 1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
def test_state_pass_value_column_splits(poisoned, device, weighted):
    """The state pass with its value columns split across programs (BLOCK_V < D) gives the
    sums of one program for all columns, in bf16 as the GPU runs it (a split that scaled b in
    registers once gave wrong weighted sums or an illegal address on the GPU)."""
    n, d, r = 150, 64, 3  # two chunks of 128 rows, the last short
    a, b, _, _, _, wf = inputs(1, 2, n, d, torch.bfloat16, device, seed=31)
    weights = None
    if weighted:
        gen = torch.Generator().manual_seed(4)
        den = (torch.rand(2, r, n, generator=gen) + 0.5).to(device)
        weights = (den, torch.randn(2, r, n, generator=gen).to(device), wf)
    base = fmm_config(d, torch.device(device))
    sums = {}
    for block_v in (64, 32, 16):
        config = dataclasses.replace(base, state=dataclasses.replace(base.state, block_v=block_v))
        sums[block_v] = state_pass(a, b, r, True, 128, config, weights)
    for block_v in (32, 16):
        for got, want in zip(sums[block_v], sums[64]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("map0", [0, 2])
def test_prefix_states_are_exclusive_cumsums(poisoned, device, map0):
    """A map's chunk prefix states (a short last chunk) are the float64 sums of
    phi(k_j) v_j^T and phi(k_j) over the keys before each chunk."""
    n, d, rows = 200, 16, 64
    k, v, *_ = inputs(1, 2, n, d, torch.float32, device, seed=21 + map0)
    states, states_z = prefix_states(k, v, rows, fmm_config(d, torch.device(device)), map0)
    phi = [lambda x: torch.nn.functional.elu(x) + 1, lambda x: torch.nn.functional.elu(-x) + 1,
           lambda x: torch.tanh(x) + 1][map0]
    fk, vd = phi(k.double().cpu()), v.double().cpu()
    starts = range(0, n, rows)
    want = torch.stack([fk[:, :, :s].transpose(-1, -2) @ vd[:, :, :s] for s in starts], 2)
    want_z = torch.stack([fk[:, :, :s].sum(2) for s in starts], 2)
    assert states.shape == (2, 4, 1, d, d)
    torch.testing.assert_close(states[:, :, 0].cpu().double(), want.flatten(0, 1),
                               rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(states_z[:, :, 0].cpu().double(), want_z.flatten(0, 1),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reverse", [False, True], ids=["prefix", "suffix"])
def test_scan_of_chunk_states(poisoned, device, reverse):
    """Each chunk's exclusive prefix (suffix) over 151 chunk states, three blocks of the
    scan's 64 with a short last one, equals torch's cumsum, in place."""
    bh, n_chunks, r, d = 2, 151, 2, 16
    gen = torch.Generator().manual_seed(7 + reverse)
    chunks = torch.randn(bh, n_chunks, r, d, d + 1, generator=gen).to(device)
    if reverse:
        want = chunks.flip(1).cumsum(1).flip(1) - chunks
    else:
        want = chunks.cumsum(1) - chunks
    states, states_z = chunks[..., :d].contiguous(), chunks[..., d].contiguous()
    scan(states, states_z, reverse)
    torch.testing.assert_close(states, want[..., :d], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(states_z, want[..., d], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sms,bwd_per_sm,stride", [(7, 2, 1), (7, 1, 2), (5, 1, 3)])
def test_causal_backward_walks_forward_chunks_in_groups(poisoned, device, sms, bwd_per_sm,
                                                        stride):
    """The causal backward's walks take the forward's chunks `stride` at a time, each group
    from its first chunk's kept prefix state; the last group may be short. Every gradient
    matches the reference."""
    n = 7 * (16 if device == "cpu" else 64) - 5  # 7 tiles, the last partial
    config = dataclasses.replace(fmm_config(16, torch.device(device)), sm_count=sms,
                                 far_programs_per_sm=6, bwd_programs_per_sm=bwd_per_sm)
    q, k, v, do, wn, wf = inputs(1, 2, n, 16, torch.float32, device, seed=40 + stride)
    saved = fmmformer_fwd(q, k, v, wn, wf, 9, 3, True, save=True, config=config)[1]
    assert saved.states.shape[1] == 7  # a chunk per tile in the forward
    assert -(-2 * 7 // (bwd_per_sm * sms)) == stride
    ref = reference(q, k, v, do, wn, wf, 9, 3, True)
    check_all(run_triton(q, k, v, do, wn, wf, 9, 3, True, config), ref, TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_tiny_and_zero_near_weight(poisoned, device, causal):
    """The backward recomputes the band's softmax, and its delta dO . Near, from the band's own
    scores (the forward saves no Near, and nothing is divided by w_near): with w_near at 0 and
    at 1e-6 next to w_far = 1, dL/dw_near and every other gradient still match."""
    q, k, v, do, _, _ = inputs(1, 2, 70, 16, torch.float32, device, seed=11 + causal)
    wn = torch.tensor([0.0, 1e-6], device=device)
    wf = torch.ones(2, device=device)
    ref = reference(q, k, v, do, wn, wf, 6, 3, causal)
    check_all(run_triton(q, k, v, do, wn, wf, 6, 3, causal), ref, 1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blend", ["sigmoid", "residual"])
def test_module_blend_gradients(poisoned, device, blend):
    """Through FMMformerAttention: the learnable logits get the reference gradients."""
    n, d, heads = 45, 16, 3
    q, k, v, do, _, _ = inputs(1, heads, n, d, torch.float32, device, seed=9)
    mods = [FMMformerAttention(heads, 4, 3, True, blend, impl=impl).to(device)
            for impl in (fmmformer_reference, fmmformer_triton)]
    with torch.no_grad():
        for m in mods:
            m.near_logit.copy_(torch.linspace(-1.0, 1.0, heads))
            m.far_logit.copy_(torch.linspace(0.5, -0.5, heads))
    mods[0].double()
    leaves = [[t.detach().to(dt).requires_grad_() for t in (q, k, v)]
              for dt in (torch.float64, torch.float32)]
    outs = [m(*x) for m, x in zip(mods, leaves)]
    for o, dt in zip(outs, (torch.float64, torch.float32)):
        o.backward(do.to(dt))
    assert rel_err(outs[1], outs[0]) < 1e-5
    for a, b in zip(leaves[1], leaves[0]):
        assert rel_err(a.grad, b.grad) < 1e-4
    for name in ("near_logit", "far_logit"):
        g, g_ref = getattr(mods[1], name).grad, getattr(mods[0], name).grad
        if blend == "residual" and name == "near_logit":  # w_near = 1: no gradient at all
            assert g is None and g_ref is None
        else:
            assert rel_err(g, g_ref) < 1e-4, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("n,bandwidth", [(1, 0), (1, 5), (40, 0), (40, 39), (40, 10**9),
                                         (40, 2**31 - 1)])
def test_edge_sizes(poisoned, device, causal, n, bandwidth):
    """N = 1, k = 0 and bands wider than the sequence (absurdly wide too: the largest int32
    would overflow the kernels' index arithmetic unclamped)."""
    q, k, v, do, wn, wf = inputs(1, 2, n, 16, torch.float32, device, seed=n + bandwidth % 97)
    ref = reference(q, k, v, do, wn, wf, bandwidth, 3, causal)
    got = run_triton(q, k, v, do, wn, wf, bandwidth, 3, causal)
    scale = max(r.abs().max().item() for r in ref[1:4])
    for name, g, r in zip(("o", "dq", "dk", "dv", "dw_near", "dw_far"), got, ref):
        assert torch.isfinite(g).all(), name
        # With one key (N = 1, or k = 0 and no far-field variation) some gradients vanish:
        # compare against the gradients' overall scale.
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5 * max(scale, 1.0), msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_inference_allocates_little_more_than_o(device, causal):
    """No grad: o plus the (small) states; with grad the same (the backward recomputes the
    band's softmax, so no Near and no log-sum-exp are kept; causal keeps every map's states)."""
    allocated: list[tuple[tuple[int, ...], torch.dtype]] = []

    def recording_empty(shape, dtype, dev):
        allocated.append((tuple(shape), dtype))
        return nan_empty(shape, dtype, dev)

    n, d = 100, 16
    q, k, v, _, wn, wf = inputs(1, 2, n, d, torch.float32, device, seed=4)
    o_bytes = q.numel() * q.element_size()
    with torch.no_grad(), allocate_with(recording_empty):
        o = fmmformer_triton(q, k, v, wn, wf, bandwidth=9, kernels=3, causal=causal)
    assert torch.isfinite(o).all()
    extra = [(s, dt) for s, dt in allocated if s != tuple(q.shape)]
    assert len(allocated) - len(extra) == 1, "o only, no saved Near"
    assert all(len(s) == 5 or len(s) == 4 for s, _ in extra), f"unexpected buffers {extra}"
    # The states are capped at 9% of o or the floor (8 MiB), whichever is more, and never
    # below one chunk; at this tiny N they are the few chunks that fill the (4) SMs.
    one_chunk = 2 * 3 * d * (d + 1) * 4
    cap = max(0.09 * o_bytes, one_chunk, CPU_CONFIG.state_memory_floor)
    assert sum(torch.Size(s).numel() * 4 for s, _ in extra) <= cap
    if causal:  # the map passes hold one map's chunk states at a time, each within the cap
        per_map = [s for s, _ in extra if len(s) == 5]
        assert [s[2] for s in per_map] == [1, 1, 1]
        assert all(torch.Size(s).numel() * 4 <= cap for s in per_map)

    allocated.clear()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with allocate_with(recording_empty):
        fmmformer_triton(*leaves, wn, wf, bandwidth=9, kernels=3, causal=causal)
    assert sum(s == tuple(q.shape) for s, _ in allocated) == 1, "o only, no saved Near"
    assert all(len(s) in (4, 5) for s, _ in allocated if s != tuple(q.shape)), "states only"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,d,bandwidth,kernels,dtype", [
    (77, 16, 5, 3, torch.float32), (300, 16, 30, 2, torch.bfloat16),
    (200, 64, 30, 3, torch.bfloat16),
])
def test_causal_inference_forward(poisoned, device, n, d, bandwidth, kernels, dtype):
    """Without grad the causal forward walks its own chunks (the inference walks' config and
    programs per SM): the reference output. (With grad: `test_matches_reference`.)"""
    q, k, v, do, wn, wf = inputs(1, 2, n, d, dtype, device, seed=n + kernels)
    leaves = [t.double() for t in (q, k, v, wn, wf)]
    ref = fmmformer_reference(*leaves, bandwidth=bandwidth, kernels=kernels, causal=True)
    with torch.no_grad():
        o = fmmformer_triton(q, k, v, wn, wf, bandwidth=bandwidth, kernels=kernels, causal=True)
    assert rel_err(o, ref) < TOL[dtype]


def test_bad_inputs_raise():
    q = torch.randn(1, 1, 8, 48)
    w = torch.ones(1)
    with pytest.raises(ValueError, match="head_dim"):
        fmmformer_fwd(q, q, q, w, w, 2, 3, False)
    q = torch.randn(1, 1, 8, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="dtype"):
        fmmformer_fwd(q, q, q, w, w, 2, 3, False)
    q = q.float()
    with pytest.raises(ValueError, match="bandwidth"):
        fmmformer_fwd(q, q, q, w, w, -1, 3, False)
    with pytest.raises(ValueError, match="kernels"):
        fmmformer_fwd(q, q, q, w, w, 2, 4, False)
    with pytest.raises(ValueError, match="share one dtype"):
        fmmformer_fwd(q, q.half(), q, w, w, 2, 3, False)
    q = torch.randn(1, 4, 8, 16)
    for bad in (torch.ones(1), torch.ones(3), torch.ones(4, 1)):
        with pytest.raises(ValueError, match=r"w_near must have shape \(4,\)"):
            fmmformer_fwd(q, q, q, bad, torch.ones(4), 2, 3, False)
        with pytest.raises(ValueError, match=r"w_far must have shape \(4,\)"):
            fmmformer_fwd(q, q, q, torch.ones(4), bad, 2, 3, False)


def test_registration():
    spec, ref = get_variant("fmmformer_triton"), get_variant("fmmformer")
    assert spec.family == "fmm" and spec.reference == "fmmformer"
    assert spec.params == ref.params and spec.short == ref.short and spec.choices == ref.choices
    assert "cuda" in spec.devices and ("cpu" in spec.devices) == INTERPRET
    good = Shape(1, 2, 64, 64, dtype=torch.bfloat16)
    assert spec.unsupported_reason(good, spec.params) is None
    assert spec.unsupported_reason(Shape(1, 2, 64, 48), spec.params) is not None
    fp64 = Shape(1, 2, 64, 64, dtype=torch.float64)
    assert spec.unsupported_reason(fp64, spec.params) is not None
    assert spec.unsupported_reason(good, {**spec.params, "bandwidth": -1}) is not None
    assert spec.flops(good, spec.params) == fmm_flops(good, spec.params)
    module = spec.factory(good, **spec.params)
    assert isinstance(module, FMMformerAttention) and module.impl is fmmformer_triton


@pytest.mark.parametrize("device", DEVICES)
def test_registered_factory_runs(device):
    shape = Shape(1, 2, 77, 16, causal=True)
    module = get_variant("fmmformer_triton").factory(shape, bandwidth=9, kernels=2, blend="sigmoid")
    module = module.to(device)
    q, k, v, _, _, _ = inputs(1, 2, 77, 16, torch.float32, device, seed=11)
    half = torch.full((2,), 0.5, dtype=torch.float64, device=device)
    ref = fmmformer_reference(q.double(), k.double(), v.double(), half, half,
                              bandwidth=9, kernels=2, causal=True)
    assert rel_err(module(q, k, v), ref) < 1e-4


def test_launch_options_carry_the_register_cap():
    assert KernelConfig(64, 64, 4, 1).launch() == {"num_warps": 4, "num_stages": 1}
    capped = KernelConfig(64, 64, 4, 1, maxnreg=128).launch()
    assert capped == {"num_warps": 4, "num_stages": 1, "maxnreg": 128}
    # The forward at D = 64 on a GPU: what the H100 runs measured.
    gpu = fmm_config(64, torch.device("cuda"), sm_count=132)
    assert gpu.fwd.launch()["maxnreg"] == 128 and str(gpu.fwd) == "64x64w4s1r128"
    assert str(gpu.band_bwd_kv) == "64x32w4s2" and gpu.sm_count == 132


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_module_observes_its_launch_config(device, causal):
    """The registered module reports the launch config of its last call: the kernels that
    direction launches, with their tiles, and the SM count."""
    shape = Shape(1, 2, 40, 16, causal=causal)
    module = get_variant("fmmformer_triton").factory(shape, bandwidth=3, kernels=1,
                                                     blend="sigmoid").to(device)
    assert module.observations() == {}
    q, k, v, *_ = inputs(1, 2, 40, 16, torch.float32, device, seed=1)
    with torch.no_grad():
        module(q, k, v)
    text = module.observations()["launch_config"]
    assert text == fmm_config(16, q.device).describe(causal)
    assert ("far_bwd_q=" in text) == causal
    if device == "cpu":
        assert ("far_bwd_q=16x16w4s1" in text) == causal and ("fwd=16x16w4s1" in text) != causal
        assert text.endswith("sms=4")
