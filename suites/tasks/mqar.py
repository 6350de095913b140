"""Multi-query associative recall (MQAR), the Zoology benchmark's synthetic task.

Reimplemented from its published description (Arora et al., "Zoology: Measuring and Improving
Recall in Efficient Language Models", 2023): a sequence opens with `pairs` key-value pairs
`k_1 v_1 k_2 v_2 ...`, keys drawn without repeats from the lower half of the vocabulary
(`1 .. vocab/2 - 1`) and values without repeats from the upper half. Each key is then asked
once as a query: key j is placed at position `2 pairs + 2 g_j`, with the gaps `g_j` drawn
without repeats from `0 .. (N - 2 pairs)/2 - 1` with probability proportional to
`a (g + 1)^(a - 1)` (a power law, `a = power_a`: most queries come soon after the context). The
model reads a causal sequence and, at each query position, must output the key's value; the
loss and the accuracy count only those positions (`IGNORE` elsewhere). Every other position
holds a token drawn uniformly from the whole vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100  # target of a position that is not an answer


@dataclass(frozen=True)
class MQARSpec:
    """Sizes of one MQAR setting."""

    seq_len: int
    pairs: int
    vocab: int = 8192
    power_a: float = 0.01

    def check(self) -> str | None:
        """Why this setting cannot be generated (None when it can)."""
        if self.pairs < 1:
            return f"MQAR needs at least 1 key-value pair, got {self.pairs}"
        if self.vocab // 2 - 1 < self.pairs:
            return f"MQAR vocab {self.vocab} has fewer than {self.pairs} keys in its lower half"
        space = (self.seq_len - 2 * self.pairs) // 2
        if space < self.pairs:
            return (f"MQAR with {self.pairs} pairs needs N >= {4 * self.pairs}, "
                    f"got N={self.seq_len}")
        return None


def default_pairs(seq_len: int) -> int:
    """Zoology's pair counts: N/16 (4 at 64, 16 at 256), at most 64."""
    return max(1, min(seq_len // 16, 64))


def _distinct(count: int, k: int, low: int, high: int, gen: torch.Generator) -> torch.Tensor:
    """`count` rows of `k` distinct integers in `low .. high - 1`."""
    order = torch.rand(count, high - low, generator=gen).argsort(dim=1)
    return order[:, :k] + low


def mqar_batch(spec: MQARSpec, count: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """`count` MQAR sequences: (inputs, targets), both `[count, N]` int64.

    `targets` holds the value at each query position and `IGNORE` elsewhere.
    """
    n, p, half = spec.seq_len, spec.pairs, spec.vocab // 2
    context = 2 * p
    keys = _distinct(count, p, 1, half, gen)
    values = _distinct(count, p, half, spec.vocab, gen)
    kvs = torch.stack([keys, values], dim=2).reshape(count, context)
    space = (n - context) // 2
    weights = spec.power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (spec.power_a - 1)
    gaps = torch.multinomial(weights.expand(count, space), p, replacement=False, generator=gen)
    rows = torch.arange(count)[:, None]
    queries = torch.zeros(count, n - context, dtype=torch.long)
    queries[rows, 2 * gaps] = keys
    inputs = torch.cat([kvs, queries], dim=1)
    targets = torch.full((count, n), IGNORE, dtype=torch.long)
    targets[rows, context + 2 * gaps] = values
    filler = torch.randint(spec.vocab, (count, n), generator=gen)
    empty = inputs == 0
    inputs[empty] = filler[empty]
    return inputs, targets
