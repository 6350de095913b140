"""FlexAttention variants (softmax_flex, window_flex) against the softmax and window references.

The registered factories build for CUDA (compiled kernel, CUDA block mask). On the CPU they run
with torch's eager `flex_attention` and a CPU block mask in their place, so their masks are
checked against the references' in float64; eager FlexAttention has no backward on the CPU, so
the gradients are checked on CUDA (`pytest -m cuda`), through the compiled path, against the
float64 references with the same-precision floor as the bar.
"""
from __future__ import annotations

import functools

import pytest
import torch

from harness.registry import Shape, get_variant
from suites.accuracy import FLOOR_FACTOR, forward_metrics
from tests.helpers import rand_qkv, rel_err
from tests.test_gradients import assert_within_floor, trial_for
from variants import softmax as softmax_module
from variants import window as window_module
from variants.softmax import softmax_reference
from variants.window import window_reference

N = 77  # odd: the block mask's last block is partial
# (variant, params): dense and banded, the band empty (0), narrow (3) and wider than N (100).
CASES = [("softmax_flex", {})] + [("window_flex", {"bandwidth": b}) for b in (0, 3, 100)]
IDS = [f"{name}-{params.get('bandwidth', 'all')}" for name, params in CASES]


def reference(name: str, params: dict, q, k, v, causal: bool) -> torch.Tensor:
    if name == "softmax_flex":
        return softmax_reference(q, k, v, causal)
    return window_reference(q, k, v, params["bandwidth"], causal)


@pytest.fixture
def eager_flex_on_cpu(monkeypatch):
    """The flex factories build their block mask on the CPU and call eager flex_attention."""
    from torch.nn.attention.flex_attention import flex_attention

    cpu_flex = functools.partial(softmax_module.make_flex, device="cpu")
    monkeypatch.setattr(softmax_module, "make_flex", cpu_flex)
    monkeypatch.setattr(window_module, "make_flex", cpu_flex)
    monkeypatch.setattr(softmax_module, "compiled_flex_attention", lambda: flex_attention)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_flex_masks_match_the_references(eager_flex_on_cpu, name, params, causal):
    """The registered factory's output equals its reference's in float64, odd N."""
    fn = get_variant(name).factory(Shape(1, 2, N, 16, causal), **params)
    q, k, v = rand_qkv(1, 2, N, 16)
    assert rel_err(fn(q, k, v), reference(name, params, q, k, v, causal)) < 1e-12


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_compiled_flex_within_floor_cuda(name, params, causal):
    """The compiled kernel in bf16: output and dq, dk, dv within the floor of the reference."""
    trial = trial_for(name, N, 32, torch.bfloat16, causal, seed=params.get("bandwidth", 1),
                      **params)
    metrics, reason = forward_metrics(trial, rows=None)
    assert metrics["floor_ratio"] <= FLOOR_FACTOR, reason
    assert_within_floor(trial)
