"""The device's two ceilings, measured once per CUDA run."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from harness.timing import time_closure


@dataclass(frozen=True)
class Roofline:
    """Measured copy bandwidth (bytes read + written) and bf16 matmul rate."""

    copy_gbps: float
    matmul_tflops: float

    def floor_ms(self, flops: float, nbytes: float) -> float:
        """The least time a kernel doing `flops` and moving `nbytes` can take."""
        return max(flops / (self.matmul_tflops * 1e12), nbytes / (self.copy_gbps * 1e9)) * 1e3

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def measure_roofline(device: torch.device, copy_mib: int = 1024, matmul_n: int = 8192) -> Roofline:
    """Time a large device-to-device copy and a large bf16 matmul on random data."""
    src = torch.randn(copy_mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    copy_ms = time_closure(lambda: dst.copy_(src), device).median
    copy_gbps = 2 * src.numel() * src.element_size() / (copy_ms * 1e-3) / 1e9
    del src, dst

    a = torch.randn(matmul_n, matmul_n, device=device, dtype=torch.bfloat16)
    b = torch.randn(matmul_n, matmul_n, device=device, dtype=torch.bfloat16)
    a @ b
    mm_ms = time_closure(lambda: a @ b, device).median
    matmul_tflops = 2 * matmul_n**3 / (mm_ms * 1e-3) / 1e12
    return Roofline(copy_gbps=copy_gbps, matmul_tflops=matmul_tflops)
