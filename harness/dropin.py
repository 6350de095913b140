"""Drop-in model quality: all-MiniLM-L6-v2 with a variant as the attention of every layer.

No training: the model's own q, k, v go into the variant (registered as a transformers
attention function), and the sentence embeddings (mean-pooled last hidden states, L2
normalised, as sentence-transformers configures this model) are compared with the exact
model's. Sentences run one length-bucket at a time (all sentences of one token count in one
batch), so no padding mask is needed: the variants take none. Variants run non-causal: the
model is a bidirectional encoder.
"""
from __future__ import annotations

import functools
from collections import defaultdict

import pandas as pd
import torch
import torch.nn.functional as F

from harness.registry import Shape, VariantConfig

ATTN_IMPL = "attnbench_variant"
_ACTIVE: list = []  # the attention callable of the model being run (one at a time)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if ATTN_IMPL not in AttentionInterface():
        AttentionInterface.register(ATTN_IMPL, _variant_attention)
        AttentionMaskInterface.register(ATTN_IMPL, sdpa_mask)


def _variant_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention function calling the active variant on `[B, H, N, D]` q, k, v."""
    if attention_mask is not None and not bool((attention_mask == 0).all()):
        raise ValueError("drop-in attention takes unpadded batches only")
    d = query.shape[-1]
    scaling = kwargs.get("scaling") or d**-0.5
    out = _ACTIVE[-1](query * (scaling / d**-0.5), key, value)
    return out.transpose(1, 2).contiguous(), None


class VariantAttention:
    """A variant built once per problem shape, with the runner's seeding of learnable weights."""

    def __init__(self, vc: VariantConfig, dtype: torch.dtype, seed: int = 0):
        self.vc, self.dtype, self.seed = vc, dtype, seed

    @functools.cache
    def build(self, batch: int, heads: int, n: int, head_dim: int, device: torch.device):
        shape = Shape(batch, heads, n, head_dim, False, self.dtype)
        reason = self.vc.spec.unsupported_reason(shape, self.vc.params)
        if reason:
            raise ValueError(reason)
        torch.manual_seed(self.seed)
        fn = self.vc.build(shape)
        return fn.to(device) if isinstance(fn, torch.nn.Module) else fn

    def __call__(self, q, k, v):
        fn = self.build(*q.shape, q.device)
        with torch.no_grad():
            return fn(q.to(self.dtype), k.to(self.dtype), v.to(self.dtype)).to(q.dtype)


def embed(model, tokenizer, sentences: list[str], attention=None) -> torch.Tensor:
    """`[S, hidden]` normalised mean-pooled embeddings; `attention` None runs the exact model."""
    ids = [tokenizer(s, truncation=True, max_length=512)["input_ids"] for s in sentences]
    buckets: dict[int, list[int]] = defaultdict(list)
    for i, tokens in enumerate(ids):
        buckets[len(tokens)].append(i)
    out = torch.empty(len(sentences), model.config.hidden_size)
    before = model.config._attn_implementation
    if attention is not None:
        _register()
        _ACTIVE.append(attention)
        model.set_attn_implementation(ATTN_IMPL)
    try:
        with torch.no_grad():
            for _, index in sorted(buckets.items()):
                batch = torch.tensor([ids[i] for i in index])
                hidden = model(input_ids=batch).last_hidden_state
                out[index] = F.normalize(hidden.mean(dim=1).float(), dim=-1)
    finally:
        if attention is not None:
            _ACTIVE.pop()
            model.set_attn_implementation(before)
    return out


def compare(exact: torch.Tensor, approx: torch.Tensor) -> dict[str, float]:
    """Cosine similarity of each approximate embedding to its exact one (mean, min) and
    retrieval@1: the share of sentences whose nearest exact embedding is their own."""
    cos = (exact * approx).sum(-1)
    nearest = (approx @ exact.T).argmax(dim=1)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
            "retrieval_at_1": float((nearest == torch.arange(len(exact))).double().mean())}


def dropin_table(model, tokenizer, configs: list[VariantConfig], sentences: list[str],
                 dtype: torch.dtype = torch.float32, device: str = "cpu") -> pd.DataFrame:
    """One row per variant: the number of texts, mean and min cosine to the exact model's
    embeddings, retrieval@1, status. A variant that cannot run is a row with its reason."""
    exact = embed(model, tokenizer, sentences)
    rows = []
    for vc in configs:
        row = {"variant": vc.label, "family": vc.spec.family, "dtype": str(dtype).split(".")[-1],
               "count": len(sentences)}
        reason = vc.spec.unavailable_reason(torch.device(device), vc.params)
        if reason is None:
            try:
                row.update(compare(exact, embed(model, tokenizer, sentences,
                                                VariantAttention(vc, dtype))))
                row["status"] = "ok"
            except Exception as exc:  # noqa: BLE001 - a failing variant is a row, not a crash
                reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
        if reason is not None:
            row.update(status="skipped", reason=reason)
        rows.append(row)
    return pd.DataFrame(rows)
