"""Drop-in model quality: all-MiniLM-L6-v2 with a variant as the attention of every layer.

No training: the model's own q, k, v go into the variant (registered as a transformers
attention function), and the sentence embeddings (mean-pooled last hidden states, L2
normalised, as sentence-transformers configures this model) are compared with the exact
model's. Sentences run one length-bucket at a time (all sentences of one token count in one
batch), so no padding mask is needed: the variants take none. Variants run non-causal: the
model is a bidirectional encoder.

Every variant call is also checked against exact attention of the same q, k, v by the accuracy
suite's rule (`suites.accuracy.verdict`: error against float64 exact attention at most
FLOOR_FACTOR times exact attention's own error in the variant's dtype), so a row says on how
many of its texts the variant computed exact attention in every layer: there its embedding
measures nothing of its approximation.
"""
from __future__ import annotations

import functools
from collections import defaultdict

import pandas as pd
import torch
import torch.nn.functional as F

from harness.registry import EXACT, Shape, VariantConfig, get_variant
from suites.accuracy import FLOOR_FACTOR, relative_error, verdict

ATTN_IMPL = "attnbench_variant"
COLUMNS = ("variant", "family", "dtype", "count", "tokens_min", "tokens_max", "mean_cosine",
           "min_cosine", "retrieval_at_1", "exact_texts", "status", "reason")
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


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal exact softmax attention in the dtype of `q`: the registry's exact variant's
    math, as the accuracy suite computes it."""
    rows = torch.arange(q.shape[-2], device=q.device)
    return get_variant(EXACT).rows_reference(q, k, v, rows, False)


def floor_ratio(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> float:
    """Error of `out` against exact attention of `q, k, v` in float64, over exact attention's
    own error in the dtype of `q` (the accuracy suite's floor ratio)."""
    exact = exact_attention(q.double(), k.double(), v.double())
    low = exact_attention(q, k, v)
    return verdict({"o": relative_error(out, exact)}, {"o": relative_error(low, exact)})[0]


class VariantAttention:
    """A variant built once per problem shape, with the runner's seeding of learnable weights;
    `inexact_lengths` collects the lengths N at which a call's output was not exact attention
    (floor ratio above FLOOR_FACTOR)."""

    def __init__(self, vc: VariantConfig, dtype: torch.dtype, seed: int = 0):
        self.vc, self.dtype, self.seed = vc, dtype, seed
        self.inexact_lengths: set[int] = set()

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
        given = q.dtype
        q, k, v = (t.to(self.dtype) for t in (q, k, v))
        with torch.no_grad():
            out = fn(q, k, v)
            if floor_ratio(out, q, k, v) > FLOOR_FACTOR:
                self.inexact_lengths.add(q.shape[-2])
        return out.to(given)


def token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text's token ids as the model reads it (special tokens included, at most 512)."""
    return [tokenizer(s, truncation=True, max_length=512)["input_ids"] for s in texts]


def embed(model, tokenizer, sentences: list[str], attention=None) -> torch.Tensor:
    """`[S, hidden]` normalised mean-pooled embeddings; `attention` None runs the exact model."""
    ids = token_ids(tokenizer, sentences)
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
    """One row per variant: the number of texts and their token lengths (least, most), mean
    and min cosine to the exact model's embeddings, retrieval@1, `exact_texts` (the texts at
    whose length the variant computed exact attention in every layer), status. A variant that
    cannot run is a row with its reason."""
    exact = embed(model, tokenizer, sentences)
    lengths = [len(ids) for ids in token_ids(tokenizer, sentences)]
    rows = []
    for vc in configs:
        row = {"variant": vc.label, "family": vc.spec.family, "dtype": str(dtype).split(".")[-1],
               "count": len(sentences), "tokens_min": min(lengths), "tokens_max": max(lengths)}
        reason = vc.spec.unavailable_reason(torch.device(device), vc.params)
        if reason is None:
            try:
                attention = VariantAttention(vc, dtype)
                row.update(compare(exact, embed(model, tokenizer, sentences, attention)))
                row["exact_texts"] = sum(n not in attention.inexact_lengths for n in lengths)
                row["status"] = "ok"
            except Exception as exc:  # noqa: BLE001 - a failing variant is a row, not a crash
                reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
        if reason is not None:
            row.update(status="skipped", reason=reason)
        rows.append(row)
    return pd.DataFrame(rows, columns=list(COLUMNS))
