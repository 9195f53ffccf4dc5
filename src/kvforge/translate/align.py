"""Aligning two tokenizations of the same text by the characters their tokens cover."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Alignment:
    source_ids: torch.Tensor  # [Ns]
    target_ids: torch.Tensor  # [Nt]
    index: torch.Tensor  # [Nt] source token covering each target token's last character; -1 for specials


def _encode(tokenizer, text: str):
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    if "offset_mapping" not in enc:
        raise ValueError(f"{type(tokenizer).__name__} gives no character offsets; a fast tokenizer is needed")
    return torch.tensor(enc["input_ids"]), enc["offset_mapping"]


def align(text: str, source_tokenizer, target_tokenizer) -> Alignment:
    """Tokenize ``text`` with both tokenizers; for each target token, the source token that covers the
    same text up to the target token's last character (the source has read at least what the target
    token needs). Special tokens (no characters, e.g. ``<bos>``) map to -1."""
    s_ids, s_off = _encode(source_tokenizer, text)
    t_ids, t_off = _encode(target_tokenizer, text)
    s_end = torch.tensor([e if e > b else -1 for b, e in s_off])  # specials never cover characters
    s_start = torch.tensor([b if e > b else 1 << 30 for b, e in s_off])
    covered = torch.cummax(s_end, 0).values  # characters read after each source token
    t_end = torch.tensor([e for _, e in t_off])
    j = torch.searchsorted(covered, t_end).clamp(max=len(s_ids) - 1)  # first source token that read char e-1
    # a character no source token covers (e.g. a space the source tokenizer drops): the last source token
    # before it, so no target token sees text beyond its own
    gap = s_start[j] > t_end - 1
    j = torch.where(gap & (j > 0), j - 1, j)
    special = torch.tensor([e <= b for b, e in t_off])
    index = torch.where(special, torch.full_like(j, -1), j)
    return Alignment(s_ids, t_ids, index)


def prefix_tokens(tokenizer, text: str, chars: int) -> int:
    """How many of ``text``'s tokens (specials at the start included) lie wholly within its first ``chars``
    characters: the longest token prefix of ``text`` that a cached state of ``text[:chars]`` can stand for,
    whatever the tokenizer does at the boundary. Raises ``ValueError`` for ``chars`` outside ``0..len(text)``."""
    if not 0 <= chars <= len(text):
        raise ValueError(f"a prefix of {chars} characters of a {len(text)}-character text")
    _, off = _encode(tokenizer, text)
    n = 0
    for b, e in off:
        if e > chars and e > b:
            break
        n += 1
    return n
