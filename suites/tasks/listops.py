"""ListOps, the Long Range Arena's hierarchical task, reimplemented from its description.

Tay et al., "Long Range Arena" (2021), after Nangia and Bowman (2018): an expression of the
operators MAX, MIN, MED (median, truncated to an integer) and SM (sum modulo 10) over the
digits 0-9, nested up to depth 10 with 2 to 10 arguments per operator, written in prefix form
with a closing bracket (`[MAX 2 9 [MIN 4 7 ] 0 ]`); the label is its value, one of 10 classes.
The tree grows as in LRA's generator: below the maximum depth a node is an operator with
probability 0.25, otherwise a digit, and the root is redrawn until the expression's token count
lies in `min_len .. max_len` (LRA: 500 to 2000). Sequences are padded with `PAD` to `max_len`.
"""
from __future__ import annotations

import random
import statistics
from dataclasses import dataclass

import torch

OPERATORS = ("[MAX", "[MIN", "[MED", "[SM")
CLOSE = "]"
PAD = 0
TOKENS = ("<pad>", *map(str, range(10)), *OPERATORS, CLOSE)
TOKEN_ID = {t: i for i, t in enumerate(TOKENS)}
OPERATOR_P = 0.25  # chance that a node above the maximum depth is an operator
CLASSES = 10


@dataclass(frozen=True)
class ListOpsSpec:
    """Sizes of one ListOps setting (LRA: lengths 500 to 2000, depth 10, 10 arguments)."""

    max_len: int = 2000
    min_len: int = 500
    max_depth: int = 10
    max_args: int = 10

    def check(self) -> str | None:
        """Why this setting cannot be generated (None when it can)."""
        if not 4 <= self.min_len <= self.max_len:
            return f"ListOps needs 4 <= min_len <= max_len, got {self.min_len}..{self.max_len}"
        if self.max_depth < 1 or self.max_args < 2:
            return "ListOps needs max_depth >= 1 and max_args >= 2"
        return None


def apply(op: str, args: list[int]) -> int:
    """The value of operator `op` on digit arguments."""
    if op == "[MAX":
        return max(args)
    if op == "[MIN":
        return min(args)
    if op == "[MED":
        return int(statistics.median(args))
    return sum(args) % 10


def tree(rng: random.Random, depth: int, spec: ListOpsSpec) -> tuple[list[str], int]:
    """One random (sub)expression at `depth`: its tokens and its value."""
    if depth >= spec.max_depth or rng.random() >= OPERATOR_P:
        digit = rng.randrange(10)
        return [str(digit)], digit
    op = rng.choice(OPERATORS)
    tokens, values = [op], []
    for _ in range(rng.randint(2, spec.max_args)):
        sub, value = tree(rng, depth + 1, spec)
        tokens += sub
        values.append(value)
    tokens.append(CLOSE)
    return tokens, apply(op, values)


def expression(rng: random.Random, spec: ListOpsSpec) -> tuple[list[str], int]:
    """A whole expression whose length lies in `min_len .. max_len`, and its value."""
    while True:
        tokens, value = tree(rng, 1, spec)
        if spec.min_len <= len(tokens) <= spec.max_len:
            return tokens, value


def encode(tokens: list[str], length: int) -> list[int]:
    """Token ids, padded with `PAD` to `length`."""
    return [TOKEN_ID[t] for t in tokens] + [PAD] * (length - len(tokens))


def listops_batch(spec: ListOpsSpec, count: int, rng: random.Random) -> tuple[torch.Tensor, ...]:
    """`count` expressions: (inputs `[count, max_len]` int64, labels `[count]` int64)."""
    ids, labels = [], []
    for _ in range(count):
        tokens, value = expression(rng, spec)
        ids.append(encode(tokens, spec.max_len))
        labels.append(value)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)
