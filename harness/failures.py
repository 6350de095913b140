"""How a case that ended without measurements is named: a status and a one-line reason."""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Markers of an allocator that could not serve a request, on CUDA and on the CPU.
OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory")


@dataclass
class Failure(Exception):
    """A case that ended without measurements: status in {oom, skipped, error, nan, timeout}."""

    status: str
    reason: str


def classify(exc: BaseException) -> Failure:
    """Map an exception raised by a case to its result status and a one-line reason.

    `torch.OutOfMemoryError`, `MemoryError` and allocator messages (CUDA's "out of memory",
    the CPU's "DefaultCPUAllocator: can't allocate memory") are `oom`; anything else `error`.
    """
    if isinstance(exc, Failure):
        return exc
    message = (str(exc).strip().splitlines() or [""])[0][:300]
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or any(
        marker in message.lower() for marker in OOM_MARKERS
    ):
        return Failure("oom", f"out of memory: {message or type(exc).__name__}")
    return Failure("error", f"{type(exc).__name__}: {message}")
