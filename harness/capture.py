"""Capture the q, k, v of every attention layer of a local Hugging Face model, and the file
format that holds them.

The q, k, v are taken where transformers hands them to the attention function: an attention
function registered with `transformers.AttentionInterface` records them and then runs exact
attention (`sdpa`), so every layer's inputs are the model's own. That point is after the q, k,
v projections and after rotary embeddings (Llama-like models apply them before the call), which
module forward hooks cannot reach. Keys and values of grouped-query attention are repeated to
the query heads, and a model scale other than head_dim^-0.5 is folded into q, so that
`softmax(q k^T / sqrt(D)) v` is the layer's attention.

File format (safetensors): tensors `q`, `k`, `v`, each `[layers, heads, N, head_dim]` float32;
metadata `format` = `attnbench.qkv`, `causal` (`true`/`false`), `model`, `text`, `seq_len`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

FORMAT = "attnbench.qkv"
CAPTURE_IMPL = "attnbench_capture"


class CaptureError(ValueError):
    """A model, text or q, k, v file that cannot be used (one-line message)."""


@dataclass
class QKV:
    """Captured q, k, v, each `[layers, heads, N, head_dim]`, and where they came from."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    causal: bool
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def dims(self) -> tuple[int, int, int, int]:
        """(layers, heads, N, head_dim)."""
        return tuple(self.q.shape)

    def prefix(self, n: int) -> QKV:
        """The first `n` positions (an attention problem of length n on the same vectors)."""
        cut = [t[:, :, :n].contiguous() for t in (self.q, self.k, self.v)]
        return QKV(*cut, causal=self.causal, meta={**self.meta, "seq_len": str(n)})


def load_model(model_dir: str | Path):
    """(model, tokenizer) of a local Hugging Face model directory (or a `.gguf` file, which
    transformers dequantizes; that needs the `gguf` and `accelerate` packages), in eval mode,
    on the CPU.

    Nothing is downloaded (`local_files_only`). Raises `CaptureError` when the directory or
    its config is missing or transformers cannot build the model.
    """
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()  # no progress bars or notes: errors stay one line
    logging.disable_progress_bar()
    model_dir = Path(model_dir)
    options: dict = {"local_files_only": True}
    if model_dir.suffix == ".gguf" and model_dir.is_file():
        model_dir, options["gguf_file"] = model_dir.parent, model_dir.name
    elif not (model_dir / "config.json").is_file():
        raise CaptureError(f"no Hugging Face model at {model_dir} "
                           f"(expected {model_dir}/config.json or a .gguf file)")
    try:
        model = AutoModel.from_pretrained(model_dir, **options)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, **options)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise CaptureError(f"cannot load the model at {model_dir}: {_first_line(exc)}") from None
    return model.eval(), tokenizer


def token_ids(tokenizer, text: str, n: int) -> torch.Tensor:
    """The first `n` token ids of `text` (special tokens included), shape `[1, n]`."""
    ids = tokenizer(text, truncation=True, max_length=n, return_tensors="pt")["input_ids"]
    if ids.shape[1] < n:
        raise CaptureError(f"the text has {ids.shape[1]} tokens; --seq-len {n} needs at least {n}")
    return ids


def _register() -> None:
    """Register the recording attention function with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if CAPTURE_IMPL not in AttentionInterface():
        AttentionInterface.register(CAPTURE_IMPL, _record_and_attend)
        AttentionMaskInterface.register(CAPTURE_IMPL, sdpa_mask)


_RECORDS: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]] | None = None


def _record_and_attend(module, query, key, value, attention_mask, **kwargs):
    """Attention function: record this layer's q, k, v (see module docstring), then sdpa."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if _RECORDS is not None and query.shape[-2] == key.shape[-2]:  # self-attention only
        groups = query.shape[1] // key.shape[1]
        k, v = (repeat_kv(t, groups) if groups > 1 else t for t in (key, value))
        d = query.shape[-1]
        scaling = kwargs.get("scaling") or d**-0.5
        q = query * (scaling / d**-0.5)
        causal = kwargs.get("is_causal")
        causal = bool(getattr(module, "is_causal", False) if causal is None else causal)
        _RECORDS.append((q.detach().float()[0], k.detach().float()[0], v.detach().float()[0],
                         causal))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def capture_qkv(model, input_ids: torch.Tensor, meta: dict[str, str] | None = None) -> QKV:
    """Run `model` on `input_ids` (`[1, N]`) and return every attention layer's q, k, v.

    Raises `CaptureError` when no attention layer went through transformers' attention
    interface (a model without attention modules), or the layers' shapes differ.
    """
    global _RECORDS
    _register()
    before = model.config._attn_implementation
    _RECORDS = []
    try:
        model.set_attn_implementation(CAPTURE_IMPL)
        with torch.no_grad():
            model(input_ids=input_ids)
        records = _RECORDS
    except (ValueError, TypeError) as exc:  # transformers refuses an interface it lacks
        raise CaptureError(f"{type(model).__name__} has no attention layers to capture: "
                           f"{_first_line(exc)}") from None
    finally:
        _RECORDS = None
        try:
            model.set_attn_implementation(before)
        except (ValueError, TypeError):
            pass
    if not records:
        raise CaptureError(f"{type(model).__name__} has no attention layers to capture")
    shapes = {tuple(r[0].shape) for r in records}
    if len(shapes) != 1:
        raise CaptureError(f"attention layers of {type(model).__name__} differ in shape: {shapes}")
    q, k, v = (torch.stack([r[i] for r in records]) for i in range(3))
    info = {"model": type(model).__name__, "seq_len": str(input_ids.shape[1]), **(meta or {})}
    return QKV(q, k, v, causal=records[0][3], meta=info)


def save_qkv(qkv: QKV, path: str | Path) -> None:
    """Write `qkv` as a safetensors file (format in the module docstring)."""
    from safetensors.torch import save_file

    meta = {**qkv.meta, "format": FORMAT, "causal": "true" if qkv.causal else "false"}
    tensors = {"q": qkv.q.contiguous(), "k": qkv.k.contiguous(), "v": qkv.v.contiguous()}
    save_file(tensors, str(path), metadata={k: str(v) for k, v in meta.items()})


def read_header(path: str | Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """The tensor shapes and metadata of a q, k, v file, checked without loading the tensors."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CaptureError(f"no q, k, v file at {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise CaptureError(f"{path} is not a safetensors file: {_first_line(exc)}") from None
    missing = [name for name in ("q", "k", "v") if name not in shapes]
    if missing:
        raise CaptureError(f"{path} lacks tensor(s) {', '.join(missing)}; a q, k, v file holds "
                           "q, k, v of shape [layers, heads, N, head_dim]")
    if len({shapes[n] for n in "qkv"}) != 1 or len(shapes["q"]) != 4 or 0 in shapes["q"]:
        got = ", ".join(f"{n} {list(shapes[n])}" for n in "qkv")
        raise CaptureError(f"{path}: q, k, v must share one shape [layers, heads, N, head_dim]; "
                           f"got {got}")
    return shapes, meta


def load_qkv(path: str | Path) -> QKV:
    """Read a q, k, v file written by `save_qkv` (or by a user in the same layout)."""
    from safetensors.torch import load_file

    _, meta = read_header(path)
    tensors = load_file(str(path))
    if not all(tensors[n].is_floating_point() for n in "qkv"):
        raise CaptureError(f"{path}: q, k, v must be floating-point tensors")
    q, k, v = (tensors[n].float() for n in "qkv")
    return QKV(q, k, v, causal=meta.get("causal", "false").lower() == "true", meta=meta)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
