"""Passage question answering: short passages with one planted, invented fact and an exact-match answer.

The facts are made up (names, towns, numbers, passwords drawn at random) so no model knows them without
reading the passage. A model reads the passage (or receives a KV state of it from elsewhere: a translated
cache, a quantized one) and answers ``Question: ...\\nAnswer:``; the answer counts when its first phrase
equals the planted one after normalisation.

    items = qa_set(40)
    score = qa_exact_match(model, tok, items, lambda item: prefill(model, tok, item.context))
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass

from ..state import KVState

FIRST = ["Edda", "Halvor", "Mirela", "Tobin", "Ysolde", "Caspar", "Nadia", "Oswin", "Petra", "Ruslan", "Signe",
         "Ulric", "Vesna", "Anselm", "Brigid", "Dorian", "Elif", "Fenna", "Gideon", "Ilse"]
LAST = ["Quill", "Brenn", "Marsh", "Tolland", "Vey", "Hartwig", "Orlov", "Pike", "Sandor", "Lisle", "Crane",
        "Dunmore", "Falk", "Greaves", "Holm", "Iverson"]
PLACES = ["Varnholm", "Tessaly", "Corrow", "Ashbury", "Kelvane", "Mirrin", "Dunlow", "Estery", "Falmere",
          "Grisby", "Holloway", "Irnfeld", "Juniper Cove", "Lorrach", "Pellmarsh", "Quenby"]
THINGS = ["orchard", "observatory", "library", "brewery", "ferry", "clock tower", "museum", "mill"]
WORDS = ["marigold", "copperfish", "lantern", "thistle", "quartz", "juniper", "falcon", "saffron", "obsidian",
         "meadow", "harbor", "cinnamon", "glacier", "velvet", "tamarind", "pepper"]
COLORS = ["green", "orange", "purple", "yellow", "blue", "red", "white", "brown"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
FILLER = [
    "The weather that season was mild, and the roads were dry for most of the year.",
    "Visitors often remark on the quiet streets and the smell of bread in the mornings.",
    "A small market opens on the square every Saturday, selling fish, cheese and rope.",
    "The town council meets in an old stone hall near the river.",
    "Most of the houses are built from grey timber and have steep roofs against the snow.",
    "Children walk to the school along a path lined with birch trees.",
    "The nearest railway station is a two-hour ride away by cart.",
    "In winter the harbor freezes and the boats are pulled up onto the shore.",
    "Records from that time were kept in a ledger that is now stored in the archive.",
    "Travellers are advised to carry water, because the wells are far apart.",
]


# one worked example ahead of every passage, so that small models answer in a few words (its facts use
# names outside the pools above)
DEMO = ("Read each passage and answer the question about it in a few words.\n\n"
        "Passage: The bakery in Wrenfield sells rye bread on Mondays. The baker there is a man named Joss Albery.\n"
        "Question: Who is the baker in Wrenfield?\nAnswer: Joss Albery\n\nPassage: ")


@dataclass(frozen=True)
class QAItem:
    passage: str
    question: str
    answer: str
    kind: str

    @property
    def context(self) -> str:
        """What the model (or the model whose cache is handed over) reads: the worked example and the passage."""
        return DEMO + self.passage

    @property
    def prompt(self) -> str:
        """What the model reads after the passage."""
        return f"\nQuestion: {self.question}\nAnswer:"


def _fact(rng: random.Random) -> tuple[str, str, str, str]:
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    place, thing = rng.choice(PLACES), rng.choice(THINGS)
    kind = rng.choice(["keeper", "count", "password", "birthplace", "month", "colour"])
    if kind == "keeper":
        return kind, f"The keeper of the {thing} in {place} is a person named {name}.", \
            f"Who is the keeper of the {thing} in {place}?", name
    if kind == "count":
        n = str(rng.randint(12, 97))
        return kind, f"The {thing} in {place} has exactly {n} windows.", \
            f"How many windows does the {thing} in {place} have?", n
    if kind == "password":
        w = rng.choice(WORDS)
        return kind, f"The password to enter the {thing} in {place} is {w}.", \
            f"What is the password to enter the {thing} in {place}?", w
    if kind == "birthplace":
        return kind, f"{name} was born in the town of {place}.", f"In which town was {name} born?", place
    if kind == "month":
        m = rng.choice(MONTHS)
        return kind, f"The {thing} in {place} opens every year in the month of {m}.", \
            f"In which month does the {thing} in {place} open?", m
    c = rng.choice(COLORS)
    return kind, f"The door of the {thing} in {place} is painted {c}.", \
        f"What colour is the door of the {thing} in {place}?", c


def qa_set(n: int = 40, seed: int = 0, fillers: int = 3) -> list[QAItem]:
    """``n`` passages of ``fillers`` neutral sentences around one planted fact, with its question."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        kind, fact, question, answer = _fact(rng)
        sents = rng.sample(FILLER, fillers)
        sents.insert(rng.randint(0, fillers), fact)
        items.append(QAItem(" ".join(sents), question, answer, kind))
    return items


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the SQuAD convention)."""
    text = text.lower()
    text = "".join(c for c in text if c not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def first_phrase(text: str) -> str:
    """The answer part of a generation: up to the first line break or sentence or clause end, without a
    leading "The answer is:"."""
    text = re.sub(r"^\s*(the )?answer( is)?\s*:?", "", text.strip(), flags=re.IGNORECASE)
    return re.split(r"[\n.,;(]", text.strip(), maxsplit=1)[0]


def exact_match(prediction: str, answer: str) -> bool:
    return normalize(first_phrase(prediction)) == normalize(answer)


def answer_in_reply(prediction: str, answer: str) -> bool:
    """The answer appears (normalized, as whole words) in the reply's first line: looser than exact match, it
    separates a fact that was carried but phrased as a sentence ("In the month of May.") from one that was lost."""
    line = prediction.strip().split("\n", 1)[0] if prediction.strip() else ""
    return f" {normalize(answer)} " in f" {normalize(line)} "


@dataclass
class QAResult:
    exact_match: float
    correct: int
    total: int
    predictions: list[str]

    def per_kind(self, items: list[QAItem]) -> dict[str, float]:
        out: dict[str, list[int]] = {}
        for item, pred in zip(items, self.predictions):
            out.setdefault(item.kind, []).append(exact_match(pred, item.answer))
        return {k: sum(v) / len(v) for k, v in out.items()}


def qa_exact_match(model, tokenizer, items: list[QAItem], state_for: Callable[[QAItem], KVState | None],
                   max_new_tokens: int = 8) -> QAResult:
    """Exact match over ``items``: the model continues from ``state_for(item)`` (the KV state of ``item.context``,
    made however the caller likes; ``None``: the model never sees it) with the question, greedily."""
    from ..generate import generate

    preds = []
    for item in items:
        state = state_for(item)
        if state is None:
            out = generate(model, tokenizer, item.prompt.lstrip(), max_new_tokens=max_new_tokens)
        else:
            out = generate(model, tokenizer, item.prompt, max_new_tokens=max_new_tokens, state=state)
        preds.append(out.text)
    correct = sum(exact_match(p, i.answer) for p, i in zip(preds, items))
    return QAResult(correct / len(items), correct, len(items), preds)
