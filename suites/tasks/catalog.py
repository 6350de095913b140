"""The trained tasks: each makes its training batches and held-out set and scores a model.

A task is built for one sequence length. Training batches come from a generator seeded by the
run's seed; the held-out set is fixed (its own seed, the same for every run), and a training
example equal to a held-out one is never used (MQAR, ListOps; the character LM holds out whole
files). `metric` names the held-out score: `accuracy` (higher is better) or `bpc` (bits per
character, lower is better). `prepare()` makes whatever data the task reads (held-out set,
training pool, corpus), so that a measurement after it sees training alone.
"""
from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from harness.errors import ConfigError
from suites.tasks import charlm, listops, mqar

TEST_SEED = 1_000_003  # the held-out sets' seed, apart from every run's


class TaskError(ConfigError):
    """A task name or size that cannot be made (one-line message)."""


def _row_keys(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x}


def _drop_rows(x: torch.Tensor, y: torch.Tensor, banned: set[bytes]):
    keep = torch.tensor([row.numpy().tobytes() not in banned for row in x], dtype=torch.bool)
    return x[keep], y[keep]


@dataclass
class MQARTask:
    """Multi-query associative recall at length N; accuracy over the answer positions."""

    seq_len: int
    pairs: int | None = None
    vocab: int = 8192
    test_count: int = 256
    name: str = "mqar"
    causal: bool = True
    metric: str = "accuracy"
    classes: None = None
    spec: mqar.MQARSpec = field(init=False)

    def __post_init__(self):
        self.spec = mqar.MQARSpec(self.seq_len, self.pairs or mqar.default_pairs(self.seq_len),
                                  self.vocab)
        problem = self.spec.check()
        if problem:
            raise TaskError(problem)

    def describe(self) -> dict:
        return {"pairs": self.spec.pairs, "vocab": self.vocab, "power_a": self.spec.power_a}

    def prepare(self) -> None:
        _ = self._test_keys  # made from the held-out set, which it makes

    @functools.cached_property
    def test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        return mqar.mqar_batch(self.spec, self.test_count, torch.Generator().manual_seed(TEST_SEED))

    @functools.cached_property
    def _test_keys(self) -> set[bytes]:
        return _row_keys(self.test_set[0])

    def train_batch(self, count: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = mqar.mqar_batch(self.spec, count, gen)
        return _drop_rows(x, y, self._test_keys)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=mqar.IGNORE)

    def score(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        """(sum of the metric over the batch's answer positions, their count)."""
        answer = y != mqar.IGNORE
        return float((logits.argmax(-1)[answer] == y[answer]).sum()), int(answer.sum())


@dataclass
class ListOpsTask:
    """ListOps expressions padded to N; accuracy of the predicted value (10 classes).

    Lengths default to 3N/4 .. N: the attention sees the padding (no key-padding mask), so it
    is kept short; the classification head pools over the non-padding positions only.
    """

    seq_len: int
    min_len: int | None = None
    max_depth: int = 10
    max_args: int = 10
    test_count: int = 256
    pool: int = 2048  # training expressions, generated once (LRA trains on a fixed set too)
    name: str = "listops"
    causal: bool = False
    metric: str = "accuracy"
    classes: int = listops.CLASSES
    vocab: int = len(listops.TOKENS)
    spec: listops.ListOpsSpec = field(init=False)

    def __post_init__(self):
        min_len = self.min_len if self.min_len is not None else max(4, 3 * self.seq_len // 4)
        self.spec = listops.ListOpsSpec(self.seq_len, min_len, self.max_depth, self.max_args)
        problem = self.spec.check()
        if problem:
            raise TaskError(problem)

    def describe(self) -> dict:
        s = self.spec
        return {"lengths": f"{s.min_len}-{s.max_len}", "max_depth": s.max_depth,
                "max_args": s.max_args, "train_pool": self.pool}

    def prepare(self) -> None:
        _listops_pool(self.spec, self.pool, self.test_count)  # and the held-out set it excludes

    @property
    def test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _listops_test(self.spec, self.test_count)

    def train_batch(self, count: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`count` examples drawn (with replacement) from the fixed training pool."""
        x, y = _listops_pool(self.spec, self.pool, self.test_count)
        pick = torch.randint(len(x), (count,), generator=gen)
        return x[pick], y[pick]

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y)


    def score(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        return float((logits.argmax(-1) == y).sum()), len(y)

@dataclass
class CharLMTask:
    """Next-byte prediction on the standard library's sources; bits per character held out."""

    seq_len: int
    test_count: int = 32  # held-out stretches, evenly spaced over the held-out text
    test_span: int = 4096  # characters per stretch, scored by windows of N
    name: str = "charlm"
    causal: bool = True
    metric: str = "bpc"
    classes: None = None
    vocab: int = charlm.VOCAB

    def __post_init__(self):
        if self.seq_len < 2:
            raise TaskError(f"charlm needs N >= 2, got N={self.seq_len}")

    def describe(self) -> dict:
        return {**charlm.load_corpus().info, "held_out_chars": self.test_set[0].numel()}

    def prepare(self) -> None:
        _ = self.test_set  # loads the corpus, both splits

    @functools.cached_property
    def test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        return charlm.test_windows(charlm.load_corpus().test, self.seq_len, self.test_count,
                                   self.test_span)

    def train_batch(self, count: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return charlm.train_windows(charlm.load_corpus().train, self.seq_len, count, gen)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    def score(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        nats = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum")
        return float(nats) / math.log(2), y.numel()


TRAIN_SEED = 17  # the ListOps training pool's seed (the pool is the same in every run)


@functools.cache
def _listops_test(spec: listops.ListOpsSpec, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out expressions (the same in every run)."""
    return listops.listops_batch(spec, count, random.Random(TEST_SEED))


@functools.cache
def _listops_pool(spec: listops.ListOpsSpec, size: int,
                  test_count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`size` training expressions less any equal to a held-out one; made once per process."""
    x, y = listops.listops_batch(spec, size, random.Random(TRAIN_SEED))
    return _drop_rows(x, y, _row_keys(_listops_test(spec, test_count)[0]))


TASKS = {"mqar": MQARTask, "listops": ListOpsTask, "charlm": CharLMTask}
Task = MQARTask | ListOpsTask | CharLMTask


def make_task(name: str, seq_len: int, **options) -> Task:
    """The task `name` at length `seq_len`; unknown names raise a one-line `TaskError`."""
    if name not in TASKS:
        raise TaskError(f"unknown task '{name}'; valid: {', '.join(TASKS)}")
    return TASKS[name](seq_len, **options)
