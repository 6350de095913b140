"""Host-side tables of the FMA kernels, cached per problem: each query tile's coarse tokens
(row, log rho, which finest blocks of the tile use them) and the pooling kernel's rows."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import triton

from variants.fma import FMAGeometry, fma_geometry, level_slots


@dataclass(frozen=True)
class FMAPlan:
    """Everything about one (length, params, query tile) that does not depend on the data."""

    geo: FMAGeometry
    causal: bool
    qb: int  # finest blocks per query tile (1 when the tile is at most one block)
    n_slots: int  # table width, a multiple of block_c (at least one tile: always readable)
    block_c: int
    idx: torch.Tensor  # [n_tiles_sb, n_slots] int32 coarse row, -1 for none
    logw: torch.Tensor  # [n_tiles_sb, n_slots] fp32 log rho (-inf for none)
    bits: torch.Tensor  # [n_tiles_sb, n_slots] int32: which finest blocks of the tile use it
    used: torch.Tensor  # [n_tiles_sb] int32: slots in use (a prefix of the tile's row)
    zlog: torch.Tensor  # [blocks] fp32 log of the zero-key weight of each block (-inf: none)
    level_off: torch.Tensor  # [max(L, 1)] int32 first row of each level
    level_win: torch.Tensor  # [max(L, 1)] int32 tokens under one coarse token of each level


@functools.lru_cache(maxsize=64)
def fma_plan(
    n: int, m: int, p: int, causal: bool, scale_attn: bool, zero_pad: bool, block_m: int,
    coarse_tile: int, device: str,
) -> FMAPlan:
    """Coarse-token tables of every query tile of `block_m` rows, merged over the finest
    blocks a tile spans, in coarse tiles of at most `coarse_tile` slots."""
    geo = fma_geometry(n, m, p)
    qb = max(block_m // m, 1)
    blocks = geo.blocks
    # Zero-key weight per block: level-0 blocks outside the sequence (m keys of weight 1 each),
    # then each level's zero slots.
    zero_w = np.zeros(blocks)
    if zero_pad:
        b = np.arange(blocks)
        zero_w += m * ((b == 0).astype(int) + (0 if causal else (b == blocks - 1).astype(int)))
    ids, logws, owners = [], [], []
    for level in range(1, geo.levels + 1):
        slots = level_slots(geo, level, causal, scale_attn, zero_pad)
        rows, logw, zero = (t.numpy() for t in slots)
        zero_w += np.where(zero, np.exp(logw), 0.0).sum(1)
        blk, col = np.nonzero(rows >= 0)
        ids.append(rows[blk, col] + geo.offsets[level - 1])
        logws.append(logw[blk, col])
        owners.append(blk)
    zlog = np.where(zero_w > 0, np.log(np.maximum(zero_w, 1e-300)), -np.inf)

    n_sb = -(-blocks // qb)
    if ids:
        ids, logws, owners = np.concatenate(ids), np.concatenate(logws), np.concatenate(owners)
        # One entry per (tile, coarse row), with a bit for each finest block of the tile using it.
        key = (owners // qb) * geo.total_rows + ids
        uniq, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        bits = np.zeros(len(uniq), dtype=np.int64)
        np.bitwise_or.at(bits, inverse, 1 << (owners % qb))
        tile = uniq // geo.total_rows
        pos = np.arange(len(uniq)) - np.searchsorted(tile, tile)  # rank inside the tile
        width = int(pos.max()) + 1
    else:
        width = 0
    block_c = min(coarse_tile, max(16, triton.next_power_of_2(max(width, 1))))
    n_slots = max(-(-width // block_c), 1) * block_c
    idx_t = np.full((n_sb, n_slots), -1, dtype=np.int32)
    logw_t = np.full((n_sb, n_slots), -np.inf, dtype=np.float32)
    bits_t = np.zeros((n_sb, n_slots), dtype=np.int32)
    used_t = np.zeros(n_sb, dtype=np.int32)
    if width:
        idx_t[tile, pos] = uniq % geo.total_rows
        logw_t[tile, pos] = logws[first]
        bits_t[tile, pos] = bits
        np.maximum.at(used_t, tile, pos + 1)
    dev = torch.device(device)

    def to_dev(a, dtype):
        return torch.as_tensor(a, dtype=dtype, device=dev)

    return FMAPlan(
        geo, causal, qb, n_slots, block_c,
        to_dev(idx_t, torch.int32), to_dev(logw_t, torch.float32), to_dev(bits_t, torch.int32),
        to_dev(used_t, torch.int32), to_dev(zlog, torch.float32),
        to_dev(list(geo.offsets) or [0], torch.int32),
        to_dev(list(geo.windows) or [1], torch.int32),
    )  # fmt: skip


@functools.lru_cache(maxsize=64)
def pool_table(windows: tuple[int, ...], chunk: int, device: str) -> tuple[torch.Tensor, int]:
    """The pooling kernel's rows for chunks of `chunk` tokens: `[3, rows]` int32 (level, or -1
    for padding; first and end token in the chunk) for every window of every level that fits
    in a chunk, and the number of such levels."""
    chunk_levels = sum(w <= chunk for w in windows)
    spans = [(lvl, s, s + w) for lvl, w in enumerate(windows[:chunk_levels])
             for s in range(0, chunk, w)]  # fmt: skip
    rows = triton.next_power_of_2(max(len(spans), 16))  # tl.dot needs >= 16 rows
    table = np.zeros((3, rows), dtype=np.int32)
    table[0] = -1
    table[:, : len(spans)] = np.array(spans, dtype=np.int32).T
    return torch.as_tensor(table, device=torch.device(device)), chunk_levels
