"""Fixtures and markers shared by the tests: `poisoned` (every buffer the Triton kernels
allocate starts as NaN) and the `cuda` marker (skipped without a CUDA device)."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import nan_empty


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture
def poisoned():
    """Every buffer the Triton kernels allocate (outputs, states, statistics) starts as NaN."""
    from variants.triton_common import allocate_with

    with allocate_with(nan_empty):
        yield
