"""Needle retrieval: a planted fact in a haystack of offline text, asked for at the end.

For each context length and depth, a sentence "<name>'s secret number is <number>." is inserted at that
fraction of a haystack cut from the evaluation text (at a line boundary). The haystack is prefilled into
the cache under test; the question is a separate forward pass, so it reads the *stored* past; the
answer is decoded greedily and counts as correct when it contains the number.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

from .. import run
from ..progress import progress
from .common import CacheLike, cache_factory

NAMES = ["Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kira", "Luca"]


@dataclass
class NeedleResult:
    cache: str
    lengths: list[int]
    depths: list[float]
    trials: int
    accuracy: list[list[float]]  # [len(lengths)][len(depths)]
    records: list[dict] = field(default_factory=list)

    @property
    def mean_accuracy(self) -> float:
        cells = [a for row in self.accuracy for a in row]
        return sum(cells) / max(1, len(cells))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean_accuracy"] = self.mean_accuracy
        return d


def make_haystack(tokenizer, text: str, length: int, depth: float, name: str, number: str, offset: int = 0):
    """``(document, question)`` strings: ~``length`` tokens of text with the needle at ``depth``."""
    needle = f"\n{name}'s secret number is {number}.\n"
    question = f"\n\nQuestion: What is {name}'s secret number?\nAnswer: {name}'s secret number is"
    budget = length - len(tokenizer(needle + question, add_special_tokens=False).input_ids)
    if budget < 16:
        raise ValueError(f"context length {length} is too short for a needle and a question")
    piece = text[offset : offset + budget * 8]
    ids = tokenizer(piece, add_special_tokens=False).input_ids[:budget]
    if len(ids) < budget:
        raise ValueError(f"not enough text for a {length}-token haystack at offset {offset}")
    hay = tokenizer.decode(ids, skip_special_tokens=True)
    at = int(depth * len(hay))
    nl = hay.rfind("\n", 0, at) if depth > 0 else 0  # insert at a line boundary at or before the depth
    at = nl if depth < 1 and nl > 0 else (len(hay) if depth >= 1 else 0)
    return hay[:at] + needle + hay[at:], question


def _answer(model, tokenizer, document: str, question: str, cache, max_new_tokens: int) -> str:
    device = run.model_device(model)
    doc = run.encode(tokenizer, document).to(device)
    q = run.encode(tokenizer, question, special=False).to(device)
    run.prefill(model, doc, cache)
    logits = run.prefill(model, q, cache)  # a separate pass: the question reads the *stored* document
    new, _ = run.decode(model, cache, logits, max_new_tokens, log_probs=False)
    return tokenizer.decode(new[0].tolist(), skip_special_tokens=True)


def needle(
    model,
    tokenizer,
    cache: CacheLike = "dynamic",
    lengths: tuple[int, ...] = (512, 1024),
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0),
    trials: int = 2,
    seed: int = 0,
    text: str | None = None,
    max_new_tokens: int = 8,
    show_progress: bool = True,
) -> NeedleResult:
    """Retrieval accuracy per (context length, depth) with the haystack held in ``cache``."""
    for d in depths:
        if not 0 <= d <= 1:
            raise ValueError(f"depths must be in [0, 1], got {d}")
    label, factory = cache_factory(cache)
    if text is None:
        from ..texts import load_text

        text = load_text("pydoc", "eval")
    rng = random.Random(seed)
    cells = [(li, di, t) for li in range(len(lengths)) for di in range(len(depths)) for t in range(trials)]
    # the same names, numbers and haystacks for every cache under test (they depend only on the seed)
    plan = [(rng.choice(NAMES), str(rng.randint(10000, 99999)), rng.randrange(0, max(1, len(text) - 200_000))) for _ in cells]
    hits = [[0] * len(depths) for _ in lengths]
    records = []
    for (li, di, t), (name, number, offset) in progress(list(zip(cells, plan)), desc=f"needle {label}", disable=not show_progress):
        doc, question = make_haystack(tokenizer, text, lengths[li], depths[di], name, number, offset)
        answer = _answer(model, tokenizer, doc, question, factory(model), max_new_tokens)
        ok = number in answer.replace(",", "")
        hits[li][di] += ok
        records.append({"length": lengths[li], "depth": depths[di], "trial": t, "number": number, "answer": answer, "correct": ok})
    acc = [[h / trials for h in row] for row in hits]
    return NeedleResult(label, list(lengths), list(depths), trials, acc, records)
