"""Where a sweep's q, k, v come from: the `--inputs` axis.

- `randn`: seeded `torch.randn` of the configured shape (`harness.trial.make_inputs`).
- `minilm`: q, k, v of every layer and head of all-MiniLM-L6-v2 on the first N tokens of
  Python's own documentation prose (N <= 512), captured when first asked for.
- `smollm2`: the same from SmolLM2-135M, a causal Llama model (N <= 8192; an optional package,
  see `harness.packaged`).
- `file:PATH`: a q, k, v file written by `run_bench.py capture` (`harness.capture`); a length
  N below the file's takes its first N positions.

A captured source fixes the problem's shape: batch = the model's layers, heads and head_dim the
model's; only the length, causality and dtype come from the configuration. Its batch index is
the layer, so per-head results name (layer, head) as (batch index, head index).
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from harness.capture import QKV, CaptureError, load_qkv, read_header
from harness.errors import ConfigError
from harness.packaged import PACKAGED
from harness.registry import Shape
from harness.trial import make_inputs

if TYPE_CHECKING:
    from harness.config import BenchConfig

RANDN = "randn"
# A suite with its own problems names them `task:NAME` (the task suite); the variant's own checks
# and the attention timing of such a case take randn q, k, v of the problem's shape.
TASK_PREFIX = "task:"
FILE_PREFIX = "file:"
CHOICES = ("randn", *PACKAGED, "file:PATH")


@dataclass(frozen=True)
class RandnInputs:
    """Seeded normal q, k, v of the configured shape."""

    name: str = RANDN
    captured: bool = False
    default_lengths: tuple[int, ...] = ()

    def shape(self, config: BenchConfig, n: int, causal: bool) -> Shape:
        return Shape(config.batch, config.heads, n, config.head_dim, causal, config.torch_dtype)

    def check_length(self, n: int) -> None:
        pass

    def tensors(self, shape: Shape, device: torch.device, seed: int) -> tuple[torch.Tensor, ...]:
        return make_inputs(shape, device, seed)


@dataclass(frozen=True)
class CapturedInputs:
    """q, k, v captured from a model: `dims` = (layers, heads, max N, head_dim)."""

    name: str
    dims: tuple[int, int, int, int]
    loader: object  # n -> QKV of length n
    captured: bool = True
    lengths: tuple[int, ...] = ()  # the lengths a run takes when none are given

    @property
    def default_lengths(self) -> tuple[int, ...]:
        top = self.dims[2]
        return self.lengths or tuple(n for n in (128, 256) if n < top) + (top,)

    def shape(self, config: BenchConfig, n: int, causal: bool) -> Shape:
        layers, heads, _, head_dim = self.dims
        return Shape(layers, heads, n, head_dim, causal, config.torch_dtype)

    def check_length(self, n: int) -> None:
        if n > self.dims[2]:
            raise ConfigError(f"inputs '{self.name}' hold N <= {self.dims[2]}; got N={n}")

    def qkv(self, n: int) -> QKV:
        try:
            return self.loader(n)
        except CaptureError as exc:
            raise ConfigError(str(exc)) from None

    def tensors(self, shape: Shape, device: torch.device, seed: int) -> tuple[torch.Tensor, ...]:
        qkv = self.qkv(shape.seq_len)
        return tuple(t.to(device=device, dtype=shape.dtype) for t in (qkv.q, qkv.k, qkv.v))


@functools.cache
def _file_qkv(path: str) -> QKV:
    return load_qkv(path)


def source(spec: str) -> RandnInputs | CapturedInputs:
    """The input source named by `spec`; `ConfigError` (one line) for anything else."""
    if spec == RANDN or spec.startswith(TASK_PREFIX):
        return RandnInputs()
    try:
        if spec in PACKAGED:
            model = PACKAGED[spec]
            layers, heads, head_dim = model.dims()
            return CapturedInputs(spec, (layers, heads, model.max_len, head_dim), model.capture,
                                  lengths=model.default_lengths)
        if is_file_spec(spec):
            path = str(Path(spec[len(FILE_PREFIX):]).resolve())
            shapes, _ = read_header(path)
            return CapturedInputs(spec, shapes["q"], lambda n: _file_qkv(path).prefix(n))
    except CaptureError as exc:
        raise ConfigError(str(exc)) from None
    raise ConfigError(f"unknown inputs '{spec}'; valid: {', '.join(CHOICES)}")


def is_file_spec(spec: str) -> bool:
    return spec.startswith(FILE_PREFIX) and len(spec) > len(FILE_PREFIX)


def absolute_spec(spec: str) -> str:
    """`file:PATH` with PATH made absolute (a run resumes from any folder); others as given."""
    if not is_file_spec(spec):
        return spec
    return FILE_PREFIX + str(Path(spec[len(FILE_PREFIX):]).expanduser().resolve())


def file_identity(spec: str) -> dict | None:
    """{"size", "sha256"} of a `file:PATH` source's file; None when it is not there."""
    path = Path(spec[len(FILE_PREFIX):])
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"size": path.stat().st_size, "sha256": digest}


def input_files(specs) -> dict[str, dict | None]:
    """{spec: file_identity} of the `file:PATH` sources among `specs` (meta.json's record)."""
    return {spec: file_identity(spec) for spec in specs if is_file_spec(spec)}


def changed_input_file(recorded: dict[str, dict | None]) -> str | None:
    """What differs between the recorded `input_files` and the files there now, else None."""
    for spec, identity in recorded.items():
        now = file_identity(spec)
        if now is None:
            return f"inputs {spec}: the file is gone"
        if now != identity:
            return (f"inputs {spec}: the file changed since the run started (size or SHA-256 "
                    f"differ from meta.json's input_files)")
    return None


def sources(config: BenchConfig) -> list[RandnInputs | CapturedInputs]:
    """The configuration's input sources, each checked against its lengths."""
    out = [source(spec) for spec in config.inputs]
    for src in out:
        for n in config.seq_lens:
            src.check_length(n)
    return out


def default_lengths(specs) -> tuple[int, ...]:
    """Lengths a run on captured sources takes when none are given: the first captured
    source's (up to its full length); `ConfigError` for a bad source name."""
    for spec in specs:
        src = source(spec)
        if src.captured:
            return src.default_lengths
    return ()
