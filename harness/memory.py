"""Peak extra memory of one call, measured on CUDA and on the CPU.

CUDA: `max_memory_allocated` during the call minus what was allocated before it.
CPU (Linux): the growth of the process's peak resident set (VmHWM) during the call, after
resetting it through /proc/self/clear_refs and returning free heap pages to the system, so
that the figure is a measurement rather than an estimate.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
from collections.abc import Callable
from pathlib import Path

import torch

MIB = 2**20
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def cpu_memory_supported() -> str | None:
    """None when CPU peak memory can be measured here, else the reason it cannot."""
    if not sys.platform.startswith("linux") or not _STATUS.exists():
        return "CPU peak memory needs Linux /proc/self/status"
    try:
        _CLEAR_REFS.write_text("5")
    except OSError as exc:
        return f"cannot reset peak RSS: {exc}"
    return None


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from {_STATUS}")


def _release_free_heap() -> None:
    """Give freed heap memory back to the OS so the next allocation shows up in the RSS."""
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


def peak_extra_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory in MiB that `fn()` needs beyond what was allocated before the call.

    Whatever `fn` returns is kept alive until the peak is read, so outputs count.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del result
        return (peak - before) / MIB

    _release_free_heap()
    before = _status_kib("VmRSS")
    _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS
    result = fn()
    peak = _status_kib("VmHWM")
    del result
    return max(0, peak - before) * 1024 / MIB
