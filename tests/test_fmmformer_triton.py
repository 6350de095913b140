"""Fused Triton FMMformer against the float64 PyTorch reference: output and every gradient
(q, k, v, w_near, w_far), odd N, causal and not, fp32 and bf16, with every kernel output
buffer poisoned with NaN first.

CPU runs need the Triton interpreter (`TRITON_INTERPRET=1` set before Triton is imported);
without it and without CUDA these tests skip. `python tests/test_fmmformer_triton.py` on a GPU
checks the benchmark shape and times it against its targets (bf16, B=1, H=16, N=65536, D=64).
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import triton

import variants.fmmformer_triton as fmt
from harness.registry import Shape, get_variant
from variants.fmmformer import FMMformerAttention, fmm_flops, fmmformer_reference
from variants.fmmformer_triton import KernelConfig, fmmformer_fwd, fmmformer_triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
NO_CPU = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1")
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CPU, CUDA = pytest.param("cpu", marks=NO_CPU), pytest.param("cuda", marks=NO_CUDA)
DEVICES = [CPU, CUDA]
# fp32: exact fp32 dots (interpreter, and "ieee" on GPU). bf16: bf16 P, dS and far-field
# operands (the interpreter also truncates instead of rounding to bf16). fp16: fp16 P and dS,
# far-field operands fp32 (tf32 on GPU).
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(x).all(), "non-finite values (unwritten or NaN output)"
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def nan_empty(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the kernels write (o, states, lse, Near, grads, ...) starts as NaN."""
    monkeypatch.setattr(fmt, "_empty", nan_empty)


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


def run_triton(q, k, v, do, w_near, w_far, bandwidth: int, kernels: int, causal: bool):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, w_near, w_far)]
    o = fmmformer_triton(*leaves, bandwidth=bandwidth, kernels=kernels, causal=causal)
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
    (300, 16, 30, 3, torch.bfloat16),
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
    _case_params("cpu", CASES, NO_CPU) + _case_params("cuda", CUDA_CASES, NO_CUDA),
)
def test_matches_reference(poisoned, device, case, causal):
    n, d, bandwidth, kernels, dtype = case
    q, k, v, do, wn, wf = inputs(1, 2, n, d, dtype, device, seed=n + d + bandwidth + causal)
    ref = reference(q, k, v, do, wn, wf, bandwidth, kernels, causal)
    got = run_triton(q, k, v, do, wn, wf, bandwidth, kernels, causal)
    check_all(got, ref, TOL[dtype])


@pytest.mark.skipif(not INTERPRET, reason="tile configs are patched for the interpreter")
@pytest.mark.parametrize("causal,map_passes", [(False, True), (True, True), (True, False)],
                         ids=["full", "causal-map-passes", "causal-fused"])
@pytest.mark.parametrize("sms,tiles_per_program,block_v", [(1, 3, 16), (64, 2, 8)])
def test_tilings_and_chunkings(poisoned, monkeypatch, causal, map_passes, sms,
                               tiles_per_program, block_v):
    """Unequal query and key tiles, several tiles per program, value columns split across
    programs, and causal chunk counts from few chunks per head (1 SM) to one tile per chunk
    (64 SMs), in the causal map passes and the fused walk: all give the reference."""
    config = KernelConfig(16, 32, 4, 1, tiles_per_program, block_v)
    monkeypatch.setattr(fmt, "INTERPRET_CONFIG", config)
    monkeypatch.setattr(fmt, "_sm_count", lambda device: sms)
    monkeypatch.setattr(fmt, "STATE_MEMORY_FRACTION", 1.0)
    monkeypatch.setattr(fmt, "CAUSAL_MAP_PASSES", map_passes)
    q, k, v, do, wn, wf = inputs(2, 1, 101, 16, torch.float32, "cpu", seed=5 + causal)
    if map_passes:  # chunks for 4 programs per SM: 2 per head on 1 SM
        programs = fmt.FAR_PROGRAMS_PER_SM * sms
        chunk_rows = fmt._chunk_rows(101, 2, 1, 16, 16, programs, 1e9)
        assert chunk_rows == (64 if sms == 1 else 16)
    else:
        chunk_rows = fmt._causal_chunk_rows(101, 2, 3, 16, 1e9, torch.device("cpu"))
        assert chunk_rows == (112 if sms == 1 else 16)
    ref = reference(q, k, v, do, wn, wf, 7, 3, causal)
    check_all(run_triton(q, k, v, do, wn, wf, 7, 3, causal), ref, 1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
def test_state_pass_value_column_splits(poisoned, monkeypatch, device, weighted):
    """The state pass with its value columns split across programs (BLOCK_V < D) gives the
    sums of one program for all columns, in bf16 as the GPU runs it (on the H100, b scaled in
    registers at 32 or 16 columns gave wrong weighted sums or an illegal address)."""
    n, d, r = 300, 64, 3
    a, b, _, _, _, wf = inputs(1, 2, n, d, torch.bfloat16, device, seed=31)
    weights = None
    if weighted:
        gen = torch.Generator().manual_seed(4)
        den = (torch.rand(2, r, n, generator=gen) + 0.5).to(device)
        weights = (den, torch.randn(2, r, n, generator=gen).to(device), wf)
    base = fmt.INTERPRET_CONFIG if device == "cpu" else fmt.CONFIGS["state"][d]
    sums = {}
    for block_v in (64, 32, 16):
        config = dataclasses.replace(base, block_v=block_v)
        monkeypatch.setattr(fmt, "INTERPRET_CONFIG", config)
        monkeypatch.setitem(fmt.CONFIGS["state"], d, config)
        sums[block_v] = fmt._state_pass(a, b, r, True, 128, weights)
    for block_v in (32, 16):
        for got, want in zip(sums[block_v], sums[64]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_prefix_states_from_parts(poisoned, device):
    """Chunk prefix states summed from 2 or 4 parts per chunk, the parts' partials in a
    scratch buffer, equal those of one part per chunk; the last chunk is short."""
    n, d, r, chunk_rows = 200, 16, 3, 64
    a, b, *_ = inputs(1, 2, n, d, torch.float32, device, seed=21)
    want = fmt._prefix_states(a, b, r, chunk_rows, parts_per_chunk=1)
    for parts in (2, 4):
        scratch = nan_empty((2, n, d), torch.float32, device)
        got = fmt._prefix_states(a, b, r, chunk_rows, scratch, parts)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert want[0].shape == (2, 4, r, d, d)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reverse", [False, True], ids=["prefix", "suffix"])
@pytest.mark.parametrize("parts_per_chunk", [1, 3])
def test_scan_of_part_states(poisoned, device, reverse, parts_per_chunk):
    """Each chunk's exclusive prefix (suffix) over 151 part states, three blocks of the
    scan's 64 with a short last one and a short last chunk, equals torch's cumsum; at one part
    a chunk also in place."""
    bh, n_parts, r, d = 2, 151, 2, 16
    gen = torch.Generator().manual_seed(7 + reverse + parts_per_chunk)
    parts = torch.randn(bh, n_parts, r, d, d + 1, generator=gen).to(device)
    chunks = -(-n_parts // parts_per_chunk)
    # Per chunk, the sum of the parts before its first (after its last).
    padded = torch.cat([parts, parts.new_zeros(bh, chunks * parts_per_chunk - n_parts, r, d,
                                               d + 1)], 1)
    per_chunk = padded.view(bh, chunks, parts_per_chunk, r, d, d + 1).sum(2)
    if reverse:
        want = per_chunk.flip(1).cumsum(1).flip(1) - per_chunk
    else:
        want = per_chunk.cumsum(1) - per_chunk
    src, src_z = parts[..., :d].contiguous(), parts[..., d].contiguous()
    if parts_per_chunk == 1:
        dst, dst_z = src, src_z
    else:
        dst = nan_empty((bh, chunks, r, d, d), torch.float32, device)
        dst_z = nan_empty((bh, chunks, r, d), torch.float32, device)
    fmt._scan(src, src_z, dst, dst_z, parts_per_chunk, reverse)
    torch.testing.assert_close(dst, want[..., :d], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dst_z, want[..., d], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_causal_backward_walks_forward_chunks_in_groups(poisoned, monkeypatch, device, stride):
    """The causal backward's walks take the forward's chunks `stride` at a time, each group
    from its first chunk's kept prefix state; the last group may be short. Every gradient
    matches the reference."""
    monkeypatch.setattr(fmt, "_walk_stride", lambda *args: stride)
    n = 7 * (16 if device == "cpu" else 64) - 5  # 7 tiles, the last partial
    monkeypatch.setattr(fmt, "_sm_count", lambda dev: 64)  # a chunk per tile in the forward
    q, k, v, do, wn, wf = inputs(1, 2, n, 16, torch.float32, device, seed=40 + stride)
    saved = fmt.fmmformer_fwd(q, k, v, wn, wf, 9, 3, True, save=True)[1]
    assert saved.states.shape[1] == 7
    ref = reference(q, k, v, do, wn, wf, 9, 3, True)
    check_all(run_triton(q, k, v, do, wn, wf, 9, 3, True), ref, TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_tiny_and_zero_near_weight(poisoned, device, causal):
    """The backward recovers the band's softmax delta from o (no saved Near): with w_near at 0
    and at 1e-6 next to w_far = 1, dL/dw_near and every other gradient still match."""
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
@pytest.mark.parametrize("n,bandwidth", [(1, 0), (1, 5), (40, 0), (40, 39), (40, 10**9)])
def test_edge_sizes(poisoned, device, causal, n, bandwidth):
    """N = 1, k = 0 and bands wider than the sequence (absurdly wide too)."""
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
def test_inference_allocates_little_more_than_o(monkeypatch, device, causal):
    """No grad: o plus the (small) states, no log-sum-exp; with grad only the log-sum-exp is
    added (the backward recovers Near's share from o, so no Near is kept)."""
    allocated: list[tuple[tuple[int, ...], torch.dtype]] = []

    def recording_empty(shape, dtype, dev):
        allocated.append((tuple(shape), dtype))
        return nan_empty(shape, dtype, dev)

    monkeypatch.setattr(fmt, "_empty", recording_empty)
    n, d = 100, 16
    q, k, v, _, wn, wf = inputs(1, 2, n, d, torch.float32, device, seed=4)
    o_bytes = q.numel() * q.element_size()
    with torch.no_grad():
        o = fmmformer_triton(q, k, v, wn, wf, bandwidth=9, kernels=3, causal=causal)
    assert torch.isfinite(o).all()
    extra = [(s, dt) for s, dt in allocated if s != tuple(q.shape)]
    assert len(allocated) - len(extra) == 1, "o only, no saved Near"
    assert all(len(s) == 5 or len(s) == 4 for s, _ in extra), f"unexpected buffers {extra}"
    # The states are capped at 9% of o or the floor (8 MiB), whichever is more, and never
    # below one chunk; at this tiny N they are the few chunks that fill the (4) SMs.
    one_chunk = 2 * 3 * d * (d + 1) * 4
    cap = max(0.09 * o_bytes, one_chunk, fmt.STATE_MEMORY_FLOOR)
    assert sum(torch.Size(s).numel() * 4 for s, _ in extra) <= cap
    if causal:  # the map passes hold one map's chunk states at a time, each within the cap
        per_map = [s for s, _ in extra if len(s) == 5]
        assert [s[2] for s in per_map] == [1, 1, 1]
        assert all(torch.Size(s).numel() * 4 <= cap for s in per_map)

    allocated.clear()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    fmmformer_triton(*leaves, wn, wf, bandwidth=9, kernels=3, causal=causal)
    assert sum(s == tuple(q.shape) for s, _ in allocated) == 1, "o only, no saved Near"
    assert ((2, n), torch.float32) in allocated, "log-sum-exp"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("map_passes", [True, False], ids=["map-passes", "fused"])
@pytest.mark.parametrize("n,d,bandwidth,kernels,dtype", [
    (77, 16, 5, 3, torch.float32), (131, 32, 0, 1, torch.float32), (300, 16, 30, 2, torch.bfloat16),
    (200, 64, 30, 3, torch.bfloat16),
])
def test_causal_forward_paths(poisoned, monkeypatch, device, map_passes, n, d, bandwidth,
                              kernels, dtype):
    """The causal forward runs a band pass and one pass per far-field map, o summed in its own
    dtype (or, switched off, the fused walk): both give the reference output, without grad
    and with it, and the backward from either gives every gradient."""
    monkeypatch.setattr(fmt, "CAUSAL_MAP_PASSES", map_passes)
    q, k, v, do, wn, wf = inputs(1, 2, n, d, dtype, device, seed=n + kernels)
    ref = reference(q, k, v, do, wn, wf, bandwidth, kernels, True)
    with torch.no_grad():
        o = fmmformer_triton(q, k, v, wn, wf, bandwidth=bandwidth, kernels=kernels, causal=True)
    assert rel_err(o, ref[0]) < TOL[dtype]
    check_all(run_triton(q, k, v, do, wn, wf, bandwidth, kernels, True), ref, TOL[dtype])


def test_bad_inputs_raise():
    q = torch.randn(1, 1, 8, 48)
    w = torch.ones(1)
    with pytest.raises(ValueError, match="head dim"):
        fmmformer_fwd(q, q, q, w, w, 2, 3, False)
    q = torch.randn(1, 1, 8, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="dtype"):
        fmmformer_fwd(q, q, q, w, w, 2, 3, False)
    q = q.float()
    with pytest.raises(ValueError, match="bandwidth"):
        fmmformer_fwd(q, q, q, w, w, -1, 3, False)
    with pytest.raises(ValueError, match="kernels"):
        fmmformer_fwd(q, q, q, w, w, 2, 4, False)
    with pytest.raises(ValueError, match="one shape and dtype"):
        fmmformer_fwd(q, q.half(), q, w, w, 2, 3, False)


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
    assert fmt.CONFIGS["fwd"][64].launch()["maxnreg"] == 128  # what the H100 runs measured


# ---------------------------------------------------------------------------------------------
# GPU check and timing (not a test): python tests/test_fmmformer_triton.py [--sweep]
# ---------------------------------------------------------------------------------------------
def bench(sweep: bool = False, odd: bool = True, baseline: bool = True,
          n: int = 65536, heads: int = 16, d: int = 64, bandwidth: int = 30) -> None:
    """Times and memory against the targets, accuracy at the benchmark shape and (`odd`) at
    N = 1001 with poisoned outputs, and (`baseline`) FlexAttention window + linear attention.
    `sweep` first tries kernel configs (printing each) and keeps the fastest."""
    import sys
    import time

    from variants.window import make_window_flex

    out_dir = os.environ.get("OUT")
    log_file = open(os.path.join(out_dir, "fmm_bench.log"), "w") if out_dir else None

    def log(*args):
        line = " ".join(str(a) for a in args)
        print(line, flush=True)
        if log_file:
            log_file.write(line + "\n")
            log_file.flush()

    dev, dtype, r = "cuda", torch.bfloat16, 3
    props = torch.cuda.get_device_properties(0)
    log(f"{props.name}, {props.multi_processor_count} SMs; "
        f"torch {torch.__version__}, triton {triton.__version__}")
    # Device ceilings: a large copy (read + write) and a large bf16 matmul.
    x = torch.empty(2**30, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    copy_ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=200)
    a = torch.randn(8192, 8192, device=dev, dtype=dtype)
    mm_ms = triton.testing.do_bench(lambda: a @ a, warmup=25, rep=200)
    copy_tbs, mm_tflops = 2 * 2**30 / copy_ms / 1e9, 2 * 8192**3 / mm_ms / 1e9
    log(f"copy {copy_tbs:.2f} TB/s, bf16 matmul {mm_tflops:.0f} TFLOP/s")
    del x, y, a

    q, k, v, do, wn, wf = inputs(1, heads, n, d, dtype, dev, seed=0)
    shape = Shape(1, heads, n, d, dtype=dtype)
    min_bytes = 4 * q.numel() * q.element_size()
    params = {"bandwidth": bandwidth, "kernels": r, "blend": "sigmoid"}
    log(f"bf16 B=1 H={heads} N={n} D={d} k={bandwidth} r={r}: qkvo {min_bytes / 1e6:.0f} MB, "
        f"floor {min_bytes / copy_tbs / 1e9:.3f} ms; "
        f"fwd {fmm_flops(shape, params) / 1e9:.1f} GFLOP")

    def fwd(causal):
        return lambda: fmmformer_triton(q, k, v, wn, wf, bandwidth=bandwidth, kernels=r,
                                        causal=causal)

    leaves = [t.clone().requires_grad_() for t in (q, k, v, wn, wf)]

    def fwd_bwd(causal):
        return lambda: fmmformer_triton(*leaves, bandwidth=bandwidth, kernels=r,
                                        causal=causal).backward(do)

    def time_ms(fn, grad=False):
        with torch.enable_grad() if grad else torch.no_grad():
            return triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8],
                                           grad_to_none=leaves if grad else None)

    if sweep:
        t0 = time.time()
        kc = KernelConfig
        trials = {  # KernelConfig(block_m, block_n, num_warps, num_stages, tiles, block_v)
            "state": [kc(64, 64, 4, 3, 1, 64), kc(64, 64, 4, 3, 1, 32), kc(64, 64, 8, 3, 1, 64),
                      kc(64, 64, 4, 4, 1, 32), kc(32, 64, 4, 4, 1, 32)],
            "fwd": [kc(64, 64, 4, 2, 1, 64), kc(64, 64, 4, 3, 1, 32), kc(64, 64, 4, 2, 1, 32),
                    kc(128, 64, 8, 3, 1, 64), kc(128, 64, 8, 2, 1, 32), kc(64, 64, 4, 3, 2, 32),
                    kc(64, 32, 4, 3, 1, 32)],
            "fwd_causal": [kc(64, 64, 8, 2, 1, 64), kc(64, 64, 8, 2, 1, 32), kc(64, 64, 8, 1, 1, 32),
                           kc(64, 64, 4, 2, 1, 32), kc(64, 64, 8, 2, 1, 16),
                           kc(64, 32, 8, 2, 1, 32)],
            "bwd": [kc(64, 64, 4, 2), kc(64, 64, 8, 2), kc(128, 64, 8, 2)],
        }
        groups = {"bwd": ("bwd_dq", "bwd_dkdv")}
        for kind, configs in trials.items():
            causal = kind.endswith("causal")
            keys = groups.get(kind, (kind,))
            best = None
            for cfg in configs:
                if time.time() - t0 > 150:
                    log(f"sweep {kind}: out of time, keeping {fmt.CONFIGS[keys[0]][d]}")
                    break
                saved = {key: fmt.CONFIGS[key][d] for key in keys}
                for key in keys:
                    fmt.CONFIGS[key][d] = cfg
                try:
                    fn = fwd_bwd(causal) if kind.startswith("bwd") else fwd(causal)
                    ms = time_ms(fn, grad=kind.startswith("bwd"))[0]
                    log(f"sweep {kind:10} {cfg}: {ms:.3f} ms")
                    if best is None or ms < best[0]:
                        best = (ms, cfg)
                except Exception as exc:  # a config that fails to compile is skipped
                    log(f"sweep {kind:10} {cfg}: failed {type(exc).__name__}: {str(exc)[:200]}")
                for key, old in saved.items():
                    fmt.CONFIGS[key][d] = old
            if best:
                for key in keys:
                    fmt.CONFIGS[key][d] = best[1]
                log(f"sweep {kind}: best {best[1]} {best[0]:.3f} ms")
        log("configs:", {key: str(val[d]) for key, val in fmt.CONFIGS.items()})

    o_bytes = q.numel() * q.element_size()
    rows = {}
    for causal in (False, True):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            o = fwd(causal)()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del o
        f = time_ms(fwd(causal))
        fb = time_ms(fwd_bwd(causal), grad=True)
        rows[causal] = (f, fb, peak)
        log(f"causal={causal}: fwd {f[0]:.3f} ms ({f[1]:.3f}-{f[2]:.3f}), "
            f"{min_bytes / f[0] / 1e6:.0f} GB/s; fwd_bwd {fb[0]:.3f} ms ({fb[1]:.3f}-{fb[2]:.3f}); "
            f"peak fwd mem {peak / 2**20:.1f} MiB = {peak / o_bytes:.3f} x o")
    for causal in (False, True):
        _, saved = fmmformer_fwd(q, k, v, wn, wf, bandwidth, r, causal, save=True)
        ms = time_ms(lambda: fmt.fmmformer_bwd(q, k, v, saved, do, wn, wf, bandwidth, r, causal))
        log(f"causal={causal}: backward alone {ms[0]:.3f} ms")
        del saved
    for causal in (False, True):
        rows_of = fmt._causal_chunk_rows if causal else fmt._state_chunk_rows
        chunk_rows = rows_of(n, heads, r, d, o_bytes, q.device)

        def state_pass():
            if causal:  # with o's bytes as scratch, as the forward
                fmt._prefix_states(k, v, r, chunk_rows, scratch=torch.empty_like(q))
            else:
                fmt._state_pass(k, v, r, causal, chunk_rows)

        ms = time_ms(state_pass)[0]
        log(f"causal={causal}: state pass (+scan) alone {ms:.3f} ms, "
            f"{triton.cdiv(n, chunk_rows)} chunks; K, V read at {2 * o_bytes / ms / 1e6:.0f} GB/s")

    # Accuracy at the benchmark shape (float64 reference on the GPU, same bf16 inputs), then
    # at an odd N with every kernel output poisoned with NaN first.
    for causal in (False, True):
        ref = reference(q, k, v, do, wn, wf, bandwidth, r, causal)
        got = run_triton(q, k, v, do, wn, wf, bandwidth, r, causal)
        errs = ", ".join(f"{name} {rel_err(g, rr):.1e}" for name, g, rr in
                         zip(("o", "dq", "dk", "dv", "dwn", "dwf"), got, ref))
        log(f"accuracy N={n} causal={causal}: {errs}")
        del ref, got
    torch.cuda.empty_cache()
    empty = fmt._empty
    fmt._empty = nan_empty
    try:
        for causal in (False, True) if odd else ():
            small = inputs(1, 4, 1001, d, dtype, dev, seed=int(causal))
            ref = reference(*small, bandwidth, r, causal)
            got = run_triton(*small, bandwidth, r, causal)
            errs = [rel_err(g, rr) for g, rr in zip(got, ref)]
            log(f"accuracy N=1001 causal={causal} (poisoned): " + ", ".join(
                f"{name} {e:.1e}" for name, e in zip(("o", "dq", "dk", "dv", "dwn", "dwf"), errs))
                + ("  OK" if max(errs) < TOL[dtype] else "  FAIL"))
    finally:
        fmt._empty = empty

    # Baseline: FlexAttention window + linear attention (Triton), back to back.
    from variants.linear_triton import linear_attention_triton

    base = {"flex": float("nan"), "lin1": float("nan"), "lin3": float("nan")}
    if baseline:
        flex = make_window_flex(shape, bandwidth=bandwidth)
        base["flex"] = time_ms(lambda: flex(q, k, v))[0]
        base["lin1"] = time_ms(lambda: linear_attention_triton(q, k, v, False, "elu"))[0]
        maps = ("elu", "elu_neg", "tanh")
        base["lin3"] = time_ms(
            lambda: [linear_attention_triton(q, k, v, False, m) for m in maps])[0]
    log(f"baseline (non-causal fwd): flex window {base['flex']:.3f} ms, "
        f"linear x1 {base['lin1']:.3f} ms, linear x3 {base['lin3']:.3f} ms")

    f, fb, peak = rows[False]
    fc = rows[True][0]
    log("\ntarget                                   value      goal")
    log(f"(1) fwd GB/s, non-causal               {min_bytes / f[0] / 1e6:7.0f}  "
        f">= {0.5 * copy_tbs * 1e3:.0f} ({f[0]:.3f} ms)")
    log(f"(2) (flex + linear x1) / fwd           {(base['flex'] + base['lin1']) / f[0]:7.2f}  >= 2")
    log(f"    (flex + linear x3) / fwd           {(base['flex'] + base['lin3']) / f[0]:7.2f}")
    log(f"(3) fwd_bwd / fwd, non-causal          {fb[0] / f[0]:7.2f}  <= 4")
    log(f"    fwd_bwd / fwd, causal              {rows[True][1][0] / fc[0]:7.2f}  <= 4")
    log(f"(6) fwd peak extra mem / o, non-causal {peak / o_bytes:7.3f}  <= 1.1")
    log(f"    causal                             {rows[True][2] / o_bytes:7.3f}  <= 1.1")
    log(f"(7) causal fwd / non-causal fwd        {fc[0] / f[0]:7.2f}  <= 1.5")
    if log_file:
        log_file.close()
    sys.stdout.flush()


if __name__ == "__main__":
    import sys

    bench(sweep="--sweep" in sys.argv, odd="--no-odd" not in sys.argv,
          baseline="--no-baseline" not in sys.argv)
