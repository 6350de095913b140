"""A small pre-norm Transformer whose attention is a registered variant.

Token embedding plus fixed sinusoidal positions, `layers` blocks of
`x + Attention(LayerNorm(x))` then `x + MLP(LayerNorm(x))` (MLP: 4x width, GELU), a final
LayerNorm and a head: next-token logits at every position (language modelling) or class
logits from the mean over the non-padding positions (classification). Each block's attention
projects to q, k, v of `[B, H, N, D]`, calls the variant built for the task's shape (one
instance per block, built by the registry's own factory, so a variant with learnable weights
trains them) and projects the heads back.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

AttentionFactory = Callable[[], Callable]  # builds one variant instance (callable or module)


def sinusoidal_positions(seq_len: int, dim: int) -> torch.Tensor:
    """`[seq_len, dim]` sine/cosine position codes (Vaswani et al.)."""
    pos = torch.arange(seq_len, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    out = torch.zeros(seq_len, dim)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq)
    return out


class VariantAttention(nn.Module):
    """Multi-head attention around one built variant (a module's parameters train with it)."""

    def __init__(self, dim: int, heads: int, variant: Callable):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.variant = variant  # a module registers itself: its parameters train with the model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, dim = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        o = self.variant(q.contiguous(), k.contiguous(), v.contiguous())
        return self.out(o.to(x.dtype).transpose(1, 2).reshape(b, n, dim))


class Block(nn.Module):
    """One pre-norm block: attention then MLP, each on a residual."""

    def __init__(self, dim: int, heads: int, variant: Callable):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = VariantAttention(dim, heads, variant)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TaskModel(nn.Module):
    """Embedding, `layers` pre-norm blocks and a language-model or classification head.

    Args:
        vocab: input alphabet size.
        seq_len: longest input (sizes the position table).
        dim, layers, heads: width, depth and attention heads (head dim = dim / heads).
        attention: builds one variant instance per block.
        classes: None for next-token logits of `vocab` symbols at every position; else the
            number of classes of a sequence label (inputs of `pad` are left out of the pool).
    """

    def __init__(self, vocab: int, seq_len: int, dim: int, layers: int, heads: int,
                 attention: AttentionFactory, classes: int | None = None, pad: int = 0):
        super().__init__()
        self.classes, self.pad = classes, pad
        self.embed = nn.Embedding(vocab, dim)
        self.register_buffer("positions", sinusoidal_positions(seq_len, dim), persistent=False)
        self.blocks = nn.ModuleList(Block(dim, heads, attention()) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes or vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.positions[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if self.classes is None:
            return self.head(x)
        keep = (tokens != self.pad).unsqueeze(-1).to(x.dtype)
        pooled = (x * keep).sum(1) / keep.sum(1).clamp(min=1)
        return self.head(pooled)
