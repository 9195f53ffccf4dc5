"""Training examples for a translator: pieces of general text and passages with planted facts, each a context
the source reads and the target tokens that follow it (:mod:`.train` distils on them).

    exs = examples(text, 128, 1000, 32, target_tokenizer) + fact_examples(128, 1000, target_tokenizer, 4.0)
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .facts import answer_mask, fact_passages


@dataclass
class Example:
    """One context (read by the source, or by the target in fuse mode) and what follows it."""

    context: str
    continuation: torch.Tensor  # target token ids
    weights: torch.Tensor | None = None  # per continuation token (answer tokens weighted up); None: all 1
    kind: str = "text"  # "text" or "facts"
    own_prefix_chars: int = 0  # the context's opening whose keys/values are the target's own (prefix cache)


def examples(text: str, n: int, context_chars: int, continuation_tokens: int, target_tokenizer,
             stride: int | None = None) -> list[Example]:
    """``n`` (context, continuation) pairs: a piece of about ``context_chars`` cut at a space, and the first
    ``continuation_tokens`` target tokens of the text right after it. Pieces start every ``stride``
    characters (default: a context and its continuation never overlap the next example)."""
    stride = stride or 2 * context_chars
    out, pos = [], 0
    while len(out) < n and pos + 2 * context_chars < len(text):
        end = text.rfind(" ", pos, pos + context_chars)
        end = pos + context_chars if end <= pos else end
        ids = target_tokenizer(text[end:end + context_chars], add_special_tokens=False, return_tensors="pt").input_ids[0]
        out.append(Example(text[pos:end], ids[:continuation_tokens]))
        pos += stride
    if len(out) < n:
        raise ValueError(f"the text holds only {len(out)} examples of {context_chars} characters every {stride}, "
                         f"{n} asked (fewer --train-examples or a shorter --context-chars)")
    return out


def fact_examples(n: int, seed: int, target_tokenizer, answer_weight: float, own_prefix: float = 0.0) -> list[Example]:
    """``n`` passages with planted facts (:func:`~kvforge.translate.facts.fact_passages`) as examples: the
    continuation asks about each fact and answers it; answer tokens weigh ``answer_weight``. A share
    ``own_prefix`` of the passages that open with a few-shot block (drawn with ``seed``) keep that opening as
    the target's own state, as a server's prefix cache holds a shared instruction, and only the passage is
    translated."""
    rng = random.Random(seed)
    out = []
    for f in fact_passages(n, seed=seed):
        ids, mask = answer_mask(target_tokenizer, f.continuation, f.answers)
        w = torch.where(torch.tensor(mask), torch.tensor(float(answer_weight)), torch.tensor(1.0))
        chars = f.shared_chars if f.shared_chars and rng.random() < own_prefix else 0
        out.append(Example(f.context, torch.tensor(ids), w, "facts", chars))
    return out
