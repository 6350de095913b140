"""Shared test helpers: dense float64 ground truth built independently of the variants, the
relative error every accuracy test uses, NaN-filled buffers, the devices a kernel test runs
on, and the project's import graph."""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# A Triton kernel test runs on the CPU under the interpreter and on CUDA (`cuda` marker).
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.cuda),
]


def rand_qkv(b: int, h: int, n: int, d: int, dtype=torch.float64, device="cpu", seed=None):
    """Fresh random q, k, v (a new seed each call unless one is given)."""
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    return tuple(torch.randn(b, h, n, d, generator=gen, dtype=torch.float64).to(device, dtype)
                 for _ in range(3))


def dense_attention(q, k, v, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax attention over the keys `allowed[i, j]` permits, as one dense N x N matrix."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v


def band_mask(n: int, bandwidth: int, causal: bool) -> torch.Tensor:
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    upper = 0 if causal else bandwidth
    return (j >= i - bandwidth) & (j <= i + upper)


def dense_linear(q, k, v, phi, causal: bool, eps: float = 1e-6) -> torch.Tensor:
    """Linear attention through the explicit N x N kernel matrix phi(Q) phi(K)^T."""
    a = phi(q) @ phi(k).transpose(-1, -2)
    if causal:
        a = a.tril()
    return (a @ v) / (a.sum(-1, keepdim=True) + eps)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; `out` must be finite (a NaN is an unwritten element)."""
    assert torch.isfinite(out).all(), "non-finite values (unwritten, NaN or overflowed output)"
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return float((out - ref).norm() / ref.norm())


def nan_empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """A NaN-filled buffer: what a kernel leaves unwritten shows up as NaN."""
    return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Project module -> the project modules it imports (any depth; not `if TYPE_CHECKING`)."""
    files = {p: ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
             for top in ("harness", "suites", "variants", "studies")
             for p in (root / top).rglob("*.py")}
    names = set(files.values())
    graph = {}
    for path, name in files.items():
        tree = ast.parse(path.read_text())
        hidden = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                  and getattr(node.test, "id", "") == "TYPE_CHECKING"
                  for b in node.body for n in ast.walk(b)}
        found = set()
        for node in ast.walk(tree):
            if id(node) in hidden:
                continue
            targets = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                       [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                       if isinstance(node, ast.ImportFrom) and not node.level else [])
            for target in targets:
                while target and target not in names:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    found.add(target)
        graph[name] = found
    return graph
