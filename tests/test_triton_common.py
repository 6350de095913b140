"""The Triton kernels' shared module: picking the fastest launch config, input checks and the
buffer allocation hook."""
from __future__ import annotations

import pytest
import torch
import triton

from harness.registry import Shape
from tests.helpers import nan_empty
from variants import triton_common
from variants.triton_common import allocate_with, check_qkv, chosen, empty, fastest


def test_fastest_times_each_candidate_once_per_problem(monkeypatch):
    """The candidate with the least median time wins; a problem seen before is not timed
    again, a new one is."""
    times = {"a": 3.0, "b": 1.0, "c": 2.0}
    timed = []

    def fake_bench(fn, warmup, rep, quantiles):
        return fn()

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    monkeypatch.setattr(triton_common, "_FASTEST", {})

    def launch(name):
        timed.append(name)
        return times[name]

    assert fastest("problem", ["a", "b", "c"], launch) == "b"
    assert fastest("problem", ["a", "b", "c"], launch) == "b" and timed == ["a", "b", "c"]
    assert chosen("problem") == "b" and chosen("other") is None
    times["a"] = 0.5
    assert fastest("other", ["a", "b", "c"], launch) == "a" and len(timed) == 6
    assert fastest("single", ["c"], launch) == "c" and len(timed) == 6  # nothing to time


def test_check_qkv_names_the_problem():
    q = torch.randn(1, 1, 8, 16)
    check_qkv("k", q, q, q)
    with pytest.raises(ValueError, match="k: q, k, v must share one"):
        check_qkv("k", q, q[..., :8], q)
    with pytest.raises(ValueError, match="share one dtype"):
        check_qkv("k", q, q.half(), q)
    with pytest.raises(ValueError, match=r"k needs head_dim in \(16, 32, 64, 128\), got 24"):
        check_qkv("k", *(torch.randn(1, 1, 8, 24) for _ in range(3)))
    with pytest.raises(ValueError, match="k needs dtype fp16/bf16/fp32"):
        check_qkv("k", *(torch.randn(1, 1, 8, 16, dtype=torch.float64) for _ in range(3)))
    assert triton_common.unsupported_shape("k", Shape(1, 1, 8, 64)) is None


def test_allocation_hook_is_scoped():
    """Buffers come from the innermost factory, and only inside its block."""
    calls = []

    def record(shape, dtype, device):
        calls.append(shape)
        return torch.zeros(shape, dtype=dtype, device=device)

    cpu = torch.device("cpu")
    with allocate_with(nan_empty):
        assert torch.isnan(empty((2, 3), torch.float32, cpu)).all()
        with allocate_with(record):
            assert (empty((2,), torch.float32, cpu) == 0).all()
        assert torch.isnan(empty((4,), torch.float32, cpu)).all()
    empty((5,), torch.float32, cpu)
    assert calls == [(2,)]
