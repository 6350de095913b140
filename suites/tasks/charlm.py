"""Character language modelling on the Python standard library's own top-level sources.

The corpus is every `*.py` file directly in the standard library directory of the running
Python (`sysconfig`'s `stdlib` path; about 4.7 MB in 168 files for Python 3.11), read as UTF-8
bytes (a 256-symbol alphabet: the sources are ASCII but for a few hundred bytes), files in name
order. The build-specific `_sysconfigdata*` files are left out. Every tenth file (positions 9,
19, ... in name order) is the held-out split, the rest is training text: no file is in both.
The files differ between Python versions, so `corpus_info` gives the size and a SHA-256 of the
corpus, which every run records.
"""
from __future__ import annotations

import functools
import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB = 256
HELDOUT_EVERY = 10


@dataclass(frozen=True)
class Corpus:
    """The two splits as byte tensors, and what the corpus is."""

    train: torch.Tensor  # uint8
    test: torch.Tensor
    info: dict


def corpus_files(root: Path | None = None) -> list[Path]:
    """The corpus files in name order."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    return [f for f in sorted(root.glob("*.py")) if not f.name.startswith("_sysconfigdata")]


def split_files(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files): every `HELDOUT_EVERY`-th file is held out."""
    test = files[HELDOUT_EVERY - 1::HELDOUT_EVERY]
    held = set(test)
    return [f for f in files if f not in held], test


@functools.cache
def load_corpus(root: str | None = None) -> Corpus:
    """The corpus of `root` (default: this Python's standard library), split."""
    files = corpus_files(Path(root) if root else None)
    train_files, test_files = split_files(files)
    train = b"".join(f.read_bytes() for f in train_files)
    test = b"".join(f.read_bytes() for f in test_files)
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    info = {"corpus": "python-stdlib-top-level-sources", "files": len(files),
            "train_bytes": len(train), "test_bytes": len(test),
            "sha256": digest.hexdigest()[:16]}
    as_tensor = lambda data: torch.frombuffer(bytearray(data), dtype=torch.uint8)  # noqa: E731
    return Corpus(as_tensor(train), as_tensor(test), info)


def train_windows(text: torch.Tensor, seq_len: int, count: int,
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` windows at random offsets: (inputs, next-character targets), `[count, N]`."""
    starts = torch.randint(len(text) - seq_len - 1, (count,), generator=gen)
    idx = starts[:, None] + torch.arange(seq_len + 1)
    chunk = text[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


def test_windows(text: torch.Tensor, seq_len: int, count: int,
                 span: int) -> tuple[torch.Tensor, ...]:
    """The held-out windows: `count` stretches of `span` characters at evenly spaced offsets
    over the whole held-out text (first at its start, last at its end), each cut into
    `span // N` consecutive windows of N (one window of N when N > span).

    Every N that divides `span` therefore scores the same characters; another N scores the
    first `(span // N) * N` of each stretch. A text too short for `count` stretches gives fewer.
    """
    per = max(1, span // seq_len)
    width = per * seq_len + 1  # a stretch's inputs and its last target
    count = max(0, min(count, len(text) // width))
    starts = torch.linspace(0, len(text) - width, count).round().long()
    offsets = (starts[:, None] + torch.arange(per) * seq_len).flatten()
    chunk = text[offsets[:, None] + torch.arange(seq_len + 1)].long()
    return chunk[:, :-1], chunk[:, 1:]
