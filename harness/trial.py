"""A prepared case: a built variant, its inputs, and the closures each mode measures."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from harness.registry import Shape, VariantConfig
from harness.roofline import Roofline

if TYPE_CHECKING:
    from harness.config import BenchConfig

# Useful work of a backward pass relative to the forward (two matmuls per forward matmul),
# and the bytes it moves (q, k, v, o, dO read; dq, dk, dv written: twice the forward's 4).
MODE_FACTOR = {"fwd": 1.0, "bwd": 2.0, "fwd_bwd": 3.0}


def make_inputs(shape: Shape, device: torch.device, seed: int) -> tuple[torch.Tensor, ...]:
    """Fresh seeded `torch.randn` q, k, v of `shape` (never zeros), made outside timing."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dims = (shape.batch, shape.heads, shape.seq_len, shape.head_dim)
    return tuple(
        torch.randn(dims, generator=gen).to(device=device, dtype=shape.dtype) for _ in range(3)
    )


@dataclass
class Trial:
    """One variant configuration built for one shape, with its inputs on the device."""

    variant: VariantConfig
    fn: Callable
    shape: Shape
    inputs: tuple[torch.Tensor, ...]
    device: torch.device
    config: BenchConfig
    roofline: Roofline | None = None
    # Facts observed while building the variant (e.g. `backend_ran`), kept for every case.
    built: dict = field(default_factory=dict)
    # Facts observed in the current case (`built` plus what the suite and variant report),
    # written to the rows' `observed` column.
    observed: dict = field(default_factory=dict)
    # Metrics of the current case that a suite flags `inexact`, with the reason.
    flags: dict[str, str] = field(default_factory=dict)
    inputs_name: str = "randn"  # the q, k, v source (harness.inputs); captured: batch = layer
    details: list[dict] = field(default_factory=list)  # per-head values a suite reports
    case: object = None  # the `harness.results.Case` being measured
    run_dir: Path | None = None  # where a suite may write files beside results.csv
    progress: Callable[[int, int], None] | None = None  # (done, total) of a long case

    @property
    def learnable(self) -> list[torch.Tensor]:
        return list(self.fn.parameters()) if isinstance(self.fn, nn.Module) else []

    def forward(self) -> torch.Tensor:
        """One inference call (no autograd graph)."""
        with torch.no_grad():
            return self.fn(*self.inputs)

    def closure(self, mode: str) -> tuple[Callable[[], object], list[torch.Tensor]]:
        """The zero-argument call that `mode` measures, and the tensors whose grads it sets.

        fwd: inference forward. bwd: backward alone through a forward stored once here.
        fwd_bwd: forward then backward.
        """
        if mode == "fwd":
            return self.forward, []
        leaves = [t.detach().requires_grad_(True) for t in self.inputs]
        grads = leaves + self.learnable
        gen = torch.Generator(device="cpu").manual_seed(self.config.seed + 1)
        d_out = torch.randn(leaves[0].shape, generator=gen).to(leaves[0])
        if mode == "bwd":
            out = self.fn(*leaves)
            return (lambda: out.backward(d_out, retain_graph=True)), grads
        return (lambda: self.fn(*leaves).backward(d_out)), grads

    def flops(self, mode: str) -> float | None:
        counter = self.variant.spec.flops
        return counter(self.shape, self.variant.params) * MODE_FACTOR[mode] if counter else None

    def min_bytes(self, mode: str) -> float:
        return self.variant.spec.min_bytes(self.shape, self.variant.params) * MODE_FACTOR[mode]
