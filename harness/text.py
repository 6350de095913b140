"""Real English prose that ships with Python: the language reference's topics in `pydoc_data`.

The topics are split in two disjoint halves: `prose()` (even-numbered topics, in name order)
is the text whose windows become captured inputs; `heldout_sentences()` and
`heldout_passages()` (odd-numbered topics) give the texts the drop-in comparison embeds.
Only prose paragraphs are kept: code samples (indented lines), grammar rules and heading
underlines are dropped.
"""
from __future__ import annotations

import functools
import re

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
UNDERLINE = re.compile(r"^[*=\-~^]{3,}$")


def _paragraphs(doc: str) -> list[str]:
    """The prose paragraphs of one topic, each joined into one line."""
    out = []
    for block in re.split(r"\n\s*\n", doc):
        lines = block.splitlines()
        if not lines or any(line.startswith((" ", "\t")) for line in lines):
            continue  # code samples and grammar rules are indented
        if any(UNDERLINE.match(line.strip()) for line in lines) or "::=" in block:
            continue
        text = " ".join(line.strip() for line in lines)
        if len(text.split()) >= 5:
            out.append(text)
    return out


@functools.cache
def _topics() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(even, odd) halves of the topics' prose paragraphs, topics in name order."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    even = tuple(p for name in names[0::2] for p in _paragraphs(topics[name]))
    odd = tuple(p for name in names[1::2] for p in _paragraphs(topics[name]))
    return even, odd


def prose() -> str:
    """The capture text: prose paragraphs of the even-numbered topics, one per line."""
    return "\n".join(_topics()[0])


def heldout_sentences(count: int, min_words: int = 6, max_words: int = 40) -> list[str]:
    """The first `count` sentences of `min_words`..`max_words` words of the odd-numbered topics
    (disjoint from `prose()`), in document order, without repeats."""
    out: list[str] = []
    for paragraph in _topics()[1]:
        for sentence in SENTENCE_END.split(paragraph):
            if min_words <= len(sentence.split()) <= max_words and sentence not in out:
                out.append(sentence)
                if len(out) == count:
                    return out
    return out


def heldout_passages(count: int, min_words: int = 60, max_words: int = 180) -> list[str]:
    """The first `count` paragraphs of `min_words`..`max_words` words of the odd-numbered
    topics (disjoint from `prose()`), in document order, without repeats."""
    out: list[str] = []
    for paragraph in _topics()[1]:
        if min_words <= len(paragraph.split()) <= max_words and paragraph not in out:
            out.append(paragraph)
            if len(out) == count:
                break
    return out


HELDOUT = {"sentences": heldout_sentences, "passages": heldout_passages}
