"""Optional peers: registration, reasons when a package is missing or broken, and (on CUDA with
the package installed) numerics against the float64 references."""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from harness.registry import Shape, get_variant
from variants import peers
from variants.linear import linear_reference
from variants.softmax import softmax_reference
from variants.window import window_reference

PEERS = {
    "linear_fla": ("linear", "linear", "fla"),
    "softmax_flash_attn": ("softmax", "softmax_naive", "flash_attn"),
    "window_flash_attn": ("window", "window", "flash_attn"),
    "softmax_xformers": ("softmax", "softmax_naive", "xformers"),
    "window_xformers": ("window", "window", "xformers"),
}
# The flash-attn peers find their package themselves (flash-attn-4 or flash-attn 2).
MISSING = {"fla": "package 'fla' is not installed",
           "xformers": "package 'xformers' is not installed",
           "flash_attn": peers.FLASH_ATTN_MISSING}  # fmt: skip
PROBES = {"fla": peers.fla_available, "flash_attn": peers.flash_attn_build,
          "xformers": peers.xformers_available}  # fmt: skip
CUDA = torch.cuda.is_available()


def runnable(name: str) -> str | None:
    """Why the peer cannot run here (None: run the numerics)."""
    return get_variant(name).unavailable_reason(torch.device("cuda" if CUDA else "cpu"))


@pytest.mark.parametrize("name", PEERS)
def test_registration(name):
    family, reference, package = PEERS[name]
    spec = get_variant(name)
    requires = () if package == "flash_attn" else (package,)
    assert (spec.family, spec.reference, spec.requires) == (family, reference, requires)
    assert spec.devices == ("cuda",)
    ref = get_variant(reference)
    assert set(spec.params) == set(ref.params)  # the harness builds the reference with them
    assert spec.unavailable_reason(torch.device("cpu")) == f"{name} runs on cuda, not cpu"


@pytest.mark.parametrize("name", PEERS)
def test_missing_package_gives_reason(name, monkeypatch):
    package = PEERS[name][2]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n.split(".")[0] == package else real(n, *a))
    peers.flash_attn_build.cache_clear()
    try:
        assert get_variant(name).unavailable_reason(torch.device("cuda")) == MISSING[package]
    finally:
        peers.flash_attn_build.cache_clear()


@pytest.mark.parametrize("package", PROBES)
def test_broken_package_gives_one_line_reason(package, monkeypatch):
    probe = PROBES[package]
    probe.cache_clear()
    monkeypatch.setattr(peers, "_has_module", lambda name: True)  # flash-attn: both "installed"
    monkeypatch.setattr(peers, "xformers_build_mismatch", lambda: None)
    monkeypatch.setitem(sys.modules, package, None)  # import now raises ImportError
    try:
        reason = probe(torch.device("cuda"))
    finally:
        probe.cache_clear()
    assert isinstance(reason, str) and reason and "\n" not in reason
    assert ("cannot run" in reason) if CUDA else ("needs CUDA" in reason)


def test_checks():
    bf16 = Shape(1, 2, 128, 64, causal=True, dtype=torch.bfloat16)
    fp32 = Shape(1, 2, 128, 64, causal=True)
    assert get_variant("linear_fla").unsupported_reason(bf16, {"feature_map": "elu"}) is None
    assert get_variant("linear_fla").unsupported_reason(fp32, {"feature_map": "elu"})
    noncausal = Shape(1, 2, 128, 64, dtype=torch.bfloat16)
    assert "non-causal" in get_variant("linear_fla").unsupported_reason(noncausal, {})
    odd = Shape(1, 2, 128, 60, dtype=torch.bfloat16)
    assert get_variant("softmax_flash_attn").unsupported_reason(odd, {})
    assert get_variant("window_flash_attn").unsupported_reason(bf16, {"bandwidth": -1})
    assert get_variant("window_xformers").unsupported_reason(fp32, {"bandwidth": 3}) is None


def inputs(n, d=64, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, n, d, generator=gen).to("cuda", dtype) for _ in range(4)]


def rel_err(x, ref):
    assert torch.isfinite(x).all()
    return ((x.double().cpu() - ref.double().cpu()).norm() / ref.double().cpu().norm()).item()


def assert_matches(fn, reference, q, k, v, do, out_tol=2e-2, grad_tol=5e-2):
    """`fn`'s output and its dq, dk, dv (through upstream gradient `do`) against `reference`
    run in float64 on the same inputs."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v)
    o.backward(do)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference(*ref_in)
    ref.backward(do.double())
    assert rel_err(o.detach(), ref) < out_tol
    for t, r in zip((q, k, v), ref_in):
        assert rel_err(t.grad, r.grad) < grad_tol


@pytest.mark.parametrize("feature_map", ["elu", "tanh"])
def test_linear_fla_cuda_matches_reference(feature_map):
    if runnable("linear_fla"):  # probed here, not at collection (the probe compiles fla)
        pytest.skip(runnable("linear_fla"))
    shape = Shape(1, 2, 333, 64, causal=True, dtype=torch.bfloat16)
    fn = get_variant("linear_fla").factory(shape, feature_map=feature_map)
    assert_matches(fn, lambda q, k, v: linear_reference(q, k, v, True, feature_map=feature_map),
                   *inputs(333))


@pytest.mark.parametrize("name", ["softmax_flash_attn", "softmax_xformers"])
@pytest.mark.parametrize("causal", [False, True])
def test_softmax_peers_cuda_match_reference(name, causal):
    """Outputs and all three gradients, at an odd length."""
    if runnable(name):
        pytest.skip(runnable(name))
    fn = get_variant(name).factory(Shape(1, 2, 257, 64, causal, torch.bfloat16))
    assert_matches(fn, lambda q, k, v: softmax_reference(q, k, v, causal), *inputs(257, seed=1))


@pytest.mark.parametrize("name", ["window_flash_attn", "window_xformers"])
@pytest.mark.parametrize("causal", [False, True])
def test_window_peers_cuda_match_reference(name, causal):
    """Outputs and all three gradients, at an odd length and bandwidth."""
    if runnable(name):
        pytest.skip(runnable(name))
    fn = get_variant(name).factory(Shape(1, 2, 257, 64, causal, torch.bfloat16), bandwidth=7)
    assert_matches(fn, lambda q, k, v: window_reference(q, k, v, 7, causal),
                   *inputs(257, seed=2))


# A stand-in for flash-attn-4's `flash_attn.cute.flash_attn_func` as its source defines it:
# `[B, N, H, D]` inputs, `(out, lse)` returned, window (left, right) keeping keys
# i - left <= j <= i + right, negative or None sides unbounded, causal forcing right = 0.
FAKE_FLASH_ATTN_4 = '''
import torch
CALLS = []
def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(None, None)):
    left, right = window_size
    if left is not None and right is not None and left < 0 and right < 0:
        left = right = None
    if causal:
        right = 0
    n = q.shape[1]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    keep = torch.ones(n, n, dtype=torch.bool)
    if left is not None:
        keep &= j >= i - left
    if right is not None:
        keep &= j <= i + right
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    scores = (qh @ kh.transpose(-1, -2)) * q.shape[-1] ** -0.5
    out = scores.masked_fill(~keep, float("-inf")).softmax(-1) @ vh
    CALLS.append((causal, window_size))
    return out.transpose(1, 2), None
'''


def test_flash_attn_4_adapter_matches_reference(tmp_path, monkeypatch):
    """Through a stand-in flash_attn.cute (on the CPU), the flash-attn peers pass the layout,
    causal flag and window that flash-attn-4 takes, unpack its (out, lse), and name it."""
    (tmp_path / "flash_attn" / "cute").mkdir(parents=True)
    (tmp_path / "flash_attn" / "cute" / "__init__.py").write_text(FAKE_FLASH_ATTN_4)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("flash_attn", "flash_attn.cute"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(peers, "_tiny", lambda: [torch.randn(1, 64, 2, 64) for _ in range(3)])
    peers.flash_attn_build.cache_clear()
    try:
        assert get_variant("softmax_flash_attn").unavailable_reason(torch.device("cuda")) is None
        q, k, v = (torch.randn(1, 2, 37, 16, dtype=torch.float64) for _ in range(3))
        for causal in (False, True):
            shape = Shape(1, 2, 37, 16, causal, torch.float64)
            dense = get_variant("softmax_flash_attn").factory(shape)
            band = get_variant("window_flash_attn").factory(shape, bandwidth=5)
            assert dense.detect_backend(q, k, v).startswith("flash-attn-4")
            assert rel_err(dense(q, k, v), softmax_reference(q, k, v, causal)) < 1e-12
            assert rel_err(band(q, k, v), window_reference(q, k, v, 5, causal)) < 1e-12
    finally:
        peers.flash_attn_build.cache_clear()
    calls = sys.modules["flash_attn.cute"].CALLS
    assert calls[-2:] == [(True, (-1, -1)), (True, (5, 0))] and (False, (5, 5)) in calls


def test_xformers_built_for_another_torch_is_skipped(tmp_path, monkeypatch):
    """An xformers whose build record names another torch is not run; the reason names both."""
    package = tmp_path / "xformers"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (tmp_path / "xformers-0.0.35.dist-info").mkdir()
    (tmp_path / "xformers-0.0.35.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: xformers\nVersion: 0.0.35\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "xformers", raising=False)
    record = package / "cpp_lib.json"
    record.write_text('{"version": {"cuda": 1208, "torch": "2.10.0+cu128", "python": "3.12"}}')
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    peers.xformers_available.cache_clear()
    try:
        reason = get_variant("softmax_xformers").unavailable_reason(torch.device("cuda"))
    finally:
        peers.xformers_available.cache_clear()
    assert reason == ("xformers 0.0.35 is built for torch 2.10.0+cu128, CUDA 12.8; "
                      "this is torch 2.11.0+cu130, CUDA 13.0")
    record.write_text('{"version": {"cuda": 1300, "torch": "2.11.0+cu130", "python": "3.12"}}')
    assert peers.xformers_build_mismatch() is None
