"""Launch configs of the FMMformer kernels: tiles, warps and stages per kernel, and how many
programs the chunked passes aim for, chosen by `fmm_config` from the head dim and device."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from variants.triton_common import sm_count as device_sm_count


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch options of one kernel."""

    block_m: int = 64  # rows of the walked tiles (queries, or keys in dk/dv)
    block_n: int = 64  # rows of the band's inner tiles
    num_warps: int = 4
    num_stages: int = 2
    tiles_per_program: int = 1  # non-causal only: consecutive tiles one program walks
    block_v: int = 128  # non-causal: value columns per program (capped at D)
    maxnreg: int | None = None  # register cap per thread (more programs per SM, maybe spills)

    def launch(self) -> dict:
        """Launch options of a kernel call."""
        opts = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.maxnreg is not None:
            opts["maxnreg"] = self.maxnreg
        return opts

    def __str__(self) -> str:
        text = f"{self.block_m}x{self.block_n}w{self.num_warps}s{self.num_stages}"
        if self.tiles_per_program != 1:
            text += f"t{self.tiles_per_program}"
        if self.block_v != 128:
            text += f"v{self.block_v}"
        return text + (f"r{self.maxnreg}" if self.maxnreg is not None else "")


# The kernels each direction of a call launches.
NONCAUSAL_KERNELS = ("state", "fwd", "bwd_dq", "bwd_dkdv")
CAUSAL_KERNELS = ("state", "band_causal", "far_causal", "far_causal_inference", "far_bwd_q",
                  "far_bwd_kv", "band_bwd_q", "band_bwd_kv")


@dataclass(frozen=True)
class FMMConfig:
    """Every launch choice of the FMMformer kernels for one head dim on one device.

    The chunked passes size their chunks from `sm_count` and a target of programs per SM:
    the state pass `state_programs_per_sm`, the causal far-field walks `far_programs_per_sm`
    (with grad; `far_inference_programs_per_sm` without, under that kernel's register cap),
    the causal backward's walks `bwd_programs_per_sm` (consecutive forward chunks are walked
    in groups to fit). Chunk states stay under `state_memory_fraction` of o's bytes or
    `state_memory_floor`, whichever is more."""

    state: KernelConfig
    fwd: KernelConfig
    bwd_dq: KernelConfig
    bwd_dkdv: KernelConfig
    band_causal: KernelConfig
    far_causal: KernelConfig
    far_causal_inference: KernelConfig
    far_bwd_q: KernelConfig
    far_bwd_kv: KernelConfig
    band_bwd_q: KernelConfig
    band_bwd_kv: KernelConfig
    sm_count: int
    state_programs_per_sm: int = 4
    far_programs_per_sm: int = 4
    far_inference_programs_per_sm: int = 3
    bwd_programs_per_sm: int = 2
    state_memory_fraction: float = 0.09
    state_memory_floor: int = 8 * 2**20

    def describe(self, causal: bool) -> str:
        """Compact text of the kernels a call of this causality launches, and the SM count."""
        kinds = CAUSAL_KERNELS if causal else NONCAUSAL_KERNELS
        return " ".join(f"{kind}={getattr(self, kind)}" for kind in kinds) + f" sms={self.sm_count}"

    def tile_multiple(self, *kinds: str) -> int:
        """The tile height of the kernels `kinds` that walk the same chunks: their largest."""
        return max(getattr(self, kind).block_m for kind in kinds)


_KINDS = tuple(f.name for f in fields(FMMConfig) if f.type == "KernelConfig")
_SMALL, _WIDE = KernelConfig(64, 64, 4, 2), KernelConfig(64, 64, 8, 2)
# Per kernel, per head dim. D=64 from H100 sweeps (bf16, H=16, N=65536; `benchmarks/`): state
# pass 3 stages; forward 1 stage capped at 128 registers (4 programs per SM despite spills);
# causal inference walks capped at 168 (3 per SM); the key-side walks 3 stages; the causal
# band dk/dv 64 keys x 32 queries. Other head dims keep the register-count choices of sm_90
# builds.
_CUDA_TILES: dict[str, dict[int, KernelConfig]] = {
    "state": {16: _SMALL, 32: _SMALL, 64: KernelConfig(64, 64, 4, 3), 128: _WIDE},
    "fwd": {16: _SMALL, 32: _SMALL, 64: KernelConfig(64, 64, 4, 1, maxnreg=128), 128: _WIDE},
    "bwd_dq": {16: _SMALL, 32: _SMALL, 64: _SMALL, 128: _WIDE},
    "bwd_dkdv": {16: _SMALL, 32: _SMALL, 64: _SMALL, 128: _WIDE},
    "band_causal": {16: _SMALL, 32: _SMALL, 64: _SMALL, 128: _WIDE},
    "far_causal": {16: _SMALL, 32: _SMALL, 64: _SMALL, 128: _WIDE},
    "far_causal_inference": {16: _SMALL, 32: _SMALL, 64: KernelConfig(64, 64, 4, 2, maxnreg=168),
                             128: _WIDE},
    "far_bwd_q": {16: _SMALL, 32: _SMALL, 64: _SMALL, 128: _WIDE},
    "far_bwd_kv": {16: _SMALL, 32: _SMALL, 64: KernelConfig(64, 64, 4, 3), 128: _WIDE},
    "band_bwd_q": {16: _SMALL, 32: _SMALL, 64: _SMALL, 128: _WIDE},
    "band_bwd_kv": {16: _SMALL, 32: _SMALL, 64: KernelConfig(64, 32, 4, 2), 128: _WIDE},
}
# The interpreter runs numpy per program: small tiles keep CPU tests fast and walk many tiles.
_INTERPRET_TILES = KernelConfig(16, 16, 4, 1)


def fmm_config(head_dim: int, device: torch.device, sm_count: int | None = None) -> FMMConfig:
    """The launch config of every FMMformer kernel for `head_dim` on `device` (CPU: the
    interpreter's small tiles), for `sm_count` SMs (default: the device's)."""
    sms = sm_count or device_sm_count(device)
    if device.type != "cuda":
        return FMMConfig(**{kind: _INTERPRET_TILES for kind in _KINDS}, sm_count=sms)
    return FMMConfig(**{kind: _CUDA_TILES[kind][head_dim] for kind in _KINDS}, sm_count=sms)
