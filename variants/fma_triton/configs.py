"""Launch configs of the FMA kernels, chosen by `fma_config` from the finest block, causality,
head dim and device."""
from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCKS = (16, 32, 64, 128, 256)  # finest blocks m the kernels take: tl.dot needs >= 16 rows


def precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 inputs get exact fp32 dots (no tf32): whoever asks for fp32
    wants the accuracy."""
    return "ieee" if dtype == torch.float32 else "tf32"


@dataclass(frozen=True)
class LaunchConfig:
    """Tiles and launch options of every FMA kernel. `block_m` may be below m (tiles inside a
    block) or a multiple of it; the key tiles divide m."""

    block_m: int = 64  # query tile of the forward and dQ kernels (the tables' granularity)
    fwd_block_n: int = 64  # near key tile of the forward
    bwd_block_n: int = 64  # near key tile of dQ, key tile of dK/dV
    dkdv_m: int = 64  # query tile of the dK/dV kernel
    num_warps: int = 4
    fwd_stages: int = 2
    bwd_stages: int = 3
    fwd_maxnreg: int | None = None  # register cap of the forward kernel (more programs per SM)
    dq_maxnreg: int | None = None  # register caps of the dQ and dK/dV kernels
    dkdv_maxnreg: int | None = None
    coarse_tile: int = 64  # widest coarse-token tile (a power of two >= 16)
    pool_windows: int = 16  # level-1 windows per pooling program
    pool_block_t: int = 128  # token rows per loaded pooling tile (halved for D > 64)
    pool_warps: int = 4
    pool_stages: int = 3

    def fwd_launch(self) -> dict:
        """The forward attention kernel's stages and register cap (warps: `num_warps`)."""
        opts = {"num_stages": self.fwd_stages}
        if self.fwd_maxnreg is not None:
            opts["maxnreg"] = self.fwd_maxnreg
        return opts

    def bwd_launch(self, kernel: str) -> dict:
        """Stages and register cap of the backward's `dq` or `dkdv` kernel."""
        cap = self.dq_maxnreg if kernel == "dq" else self.dkdv_maxnreg
        return {"num_stages": self.bwd_stages, **({"maxnreg": cap} if cap is not None else {})}

    def __str__(self) -> str:
        caps = "/".join(str(c) for c in (self.fwd_maxnreg, self.dq_maxnreg, self.dkdv_maxnreg))
        return (f"q{self.block_m} fwd_k{self.fwd_block_n}s{self.fwd_stages} "
                f"bwd_k{self.bwd_block_n}s{self.bwd_stages} dkdv_q{self.dkdv_m} "
                f"w{self.num_warps} r{caps} c{self.coarse_tile} "
                f"pool{self.pool_windows}x{self.pool_block_t}w{self.pool_warps}s{self.pool_stages}")


def fma_config(
    m: int, causal: bool, head_dim: int, device: torch.device, block_m: int | None = None
) -> LaunchConfig:
    """Default tiles for finest block m: one block (at most 64 rows) per query tile, unless
    `block_m` is given.

    GPU (H100 sweeps, bf16, D=64, m=64, N=65536; `benchmarks/`): 64-key tiles; the forward at
    D <= 64 with 2 / 1 stages (non-causal / causal) and registers capped at 96 / 128 (more
    programs per SM; lower caps spill); the backward at D <= 64 with 2 stages and both kernels
    capped at 168 registers, wider heads 3 stages uncapped; causal coarse tiles 32 wide (ragged
    tables: most tiles stop after one). The interpreter takes tiles of at most 32 rows."""
    if device.type != "cuda":
        t = min(m, 32)
        return LaunchConfig(block_m or t, t, t, t, 4, 1, 1, coarse_tile=32 if causal else 64)
    small = head_dim <= 64
    cap = (128 if causal else 96) if small else None
    bwd_cap = 168 if small else None
    return LaunchConfig(
        block_m or min(m, 64), min(m, 64), min(m, 64), 64, 4, 1 if causal else 2,
        2 if small else 3, cap, bwd_cap, bwd_cap, coarse_tile=32 if causal else 64,
    )  # fmt: skip
