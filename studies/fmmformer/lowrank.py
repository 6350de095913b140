"""The FMMformer paper's low-rank claim on captured attention maps: after removing the band of
width k, the residual A - band_k(A) has very low numerical rank ("r <= 5 at k = 10").

A = softmax(q k^T / sqrt(D)) of each layer and head (causal maps when the capture is causal);
band_k(A) keeps the entries with |i - j| <= k. The rank for a fraction f of the energy is the
fewest singular values of the residual whose squares sum to f of its squared Frobenius norm.
"""
from __future__ import annotations

import pandas as pd
import torch

from harness.capture import QKV

BANDS = (0, 5, 10, 30)
ENERGIES = (0.9, 0.99)
CLAIM_K, CLAIM_RANK = 10, 5
KEEP_SINGULAR = 64  # normalised singular values kept per map for the decay plot
LOWRANK_FILE, DECAY_FILE = "lowrank.csv", "lowrank_decay.csv"  # in the run directory


def attention_maps(qkv: QKV) -> torch.Tensor:
    """`[layers, heads, N, N]` float64 attention matrices of the captured q, k."""
    q, k = qkv.q.double(), qkv.k.double()
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if qkv.causal:
        n = q.shape[-2]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(dim=-1)


def band_mask(n: int, k: int) -> torch.Tensor:
    """`[N, N]` True where |i - j| <= k."""
    i = torch.arange(n)
    return (i[:, None] - i[None, :]).abs() <= k


def energy_rank(singular: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per map (last dim: singular values, descending), the fewest values holding `fraction`
    of the squared sum."""
    energy = singular.pow(2)
    share = energy.cumsum(-1) / energy.sum(-1, keepdim=True).clamp_min(1e-300)
    return (share < fraction - 1e-12).sum(-1) + 1


def residual_spectra(maps: torch.Tensor, bands=BANDS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(ranks, decay) of A - band_k(A) for every layer, head and k.

    ranks: one row per (k, layer, head): `rank_90`, `rank_99`, and `residual_energy`, the
    residual's share of the map's squared Frobenius norm. decay: one row per (k, layer, head,
    index) with the singular value divided by the largest, for the first `KEEP_SINGULAR`.
    """
    layers, heads, n, _ = maps.shape
    total = maps.pow(2).sum(dim=(-2, -1))
    rank_rows, decay_rows = [], []
    for k in bands:
        residual = maps.masked_fill(band_mask(n, k), 0.0)
        singular = torch.linalg.svdvals(residual)
        ranks = {f: energy_rank(singular, f) for f in ENERGIES}
        share = residual.pow(2).sum(dim=(-2, -1)) / total
        top = singular[..., :KEEP_SINGULAR] / singular[..., :1].clamp_min(1e-300)
        for layer in range(layers):
            for head in range(heads):
                rank_rows.append({
                    "k": k, "layer": layer, "head": head, "seq_len": n,
                    **{f"rank_{round(f * 100)}": int(ranks[f][layer, head]) for f in ENERGIES},
                    "residual_energy": float(share[layer, head]),
                })  # fmt: skip
                decay_rows += [{"k": k, "layer": layer, "head": head, "index": i + 1,
                                "sigma_rel": float(s)} for i, s in enumerate(top[layer, head])]
    return pd.DataFrame(rank_rows), pd.DataFrame(decay_rows)


def verdict(ranks: pd.DataFrame, k: int = CLAIM_K, rank: int = CLAIM_RANK) -> pd.DataFrame:
    """Per energy level, the share of heads whose residual at bandwidth `k` has rank <= `rank`,
    the median rank, and the verdict: holds (every head), mostly (at least half), or fails."""
    at_k = ranks[ranks["k"] == k]
    rows = []
    for f in ENERGIES:
        col = f"rank_{round(f * 100)}"
        share = float((at_k[col] <= rank).mean())
        word = "holds" if share == 1.0 else "mostly" if share >= 0.5 else "fails"
        rows.append({"energy": f"{round(f * 100)}%", "k": k, "claimed rank": f"<= {rank}",
                     "heads": len(at_k), "share of heads within": share,
                     "median rank": float(at_k[col].median()), "max rank": int(at_k[col].max()),
                     "verdict": word})
    return pd.DataFrame(rows)


def rank_summary(ranks: pd.DataFrame) -> pd.DataFrame:
    """Per bandwidth k: median, p90 and max over heads of the 90% and 99% ranks, and the
    median residual energy share."""
    agg = ranks.groupby("k").agg(
        heads=("rank_90", "size"),
        rank_90_median=("rank_90", "median"), rank_90_p90=("rank_90", lambda s: s.quantile(0.9)),
        rank_90_max=("rank_90", "max"),
        rank_99_median=("rank_99", "median"), rank_99_p90=("rank_99", lambda s: s.quantile(0.9)),
        rank_99_max=("rank_99", "max"),
        residual_energy_median=("residual_energy", "median"),
    )  # fmt: skip
    return agg.reset_index()
