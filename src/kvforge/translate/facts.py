"""Training passages with planted, invented facts: what a translator must carry for a target to answer from
a translated cache.

Each passage holds a few facts (people, places, numbers, years, code words, materials) among neutral
sentences; its continuation asks about every fact and answers it, and the answer tokens are marked so that
training can weight them up. The word pools here are disjoint from :mod:`kvforge.eval.qa`'s (a test checks
it), so a translator trained on these passages is never evaluated on a name or word it was trained on.

    ex = fact_passages(4, seed=1)[0]
    ex.context, ex.continuation, ex.answers   # text, text, [(start, end) character spans in continuation]
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FIRST = ["Aurelio", "Bettina", "Cosmo", "Delphine", "Emrys", "Farida", "Gunnar", "Hesper", "Ingrid", "Jovan",
         "Kasimir", "Leocadia", "Marek", "Nerys", "Osric", "Philippa", "Quentin", "Rosalind", "Severin", "Thora",
         "Umberto", "Valka", "Wendel", "Xanthe", "Yorick", "Zelda"]
LAST = ["Ashdown", "Blackwood", "Corvin", "Delacroix", "Eastman", "Fairweather", "Gallagher", "Hollis", "Ingram",
        "Jessup", "Kettering", "Lockhart", "Merriweather", "Northcott", "Oakhurst", "Penhale", "Radcliffe",
        "Stanway", "Thackeray", "Underhill", "Whitlock", "Yardley"]
PLACES = ["Bramwick", "Caldmoor", "Dravenport", "Eskerfield", "Foxhollow", "Glenrith", "Harrowgate", "Kestrel Point",
          "Larkspur", "Morrowdale", "Nettlebank", "Oldcastle", "Pinegate", "Ravensworth", "Stonebridge", "Thornbury",
          "Wyvern Hill", "Ambervale"]
THINGS = ["lighthouse", "granary", "chapel", "foundry", "bathhouse", "boathouse", "printing house", "dovecote",
          "theatre", "tannery", "schoolhouse", "bridge"]
ROLES = ["curator", "warden", "caretaker", "owner", "steward"]
WORDS = ["bluebell", "cobalt", "driftwood", "ember", "fennel", "garnet", "hazel", "indigo", "jasper", "kestrel",
         "lavender", "mistletoe", "nutmeg", "opal", "parsley", "quince", "rosemary", "sorrel", "topaz", "umber",
         "walnut", "yarrow"]
MATERIALS = ["slate", "copper", "thatch", "cedar", "tin", "clay tiles", "marble", "oak shingles"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
SHADES = ["teal", "crimson", "ochre", "maroon", "ivory", "navy", "scarlet", "lilac"]
# few-shot headers: an instruction (or none) before one worked passage with its question and answer
INSTRUCTIONS = ["", "Answer each question about the passage before it with a short phrase.\n\n",
                "Below are short passages, each followed by questions. Reply with just the answer.\n\n",
                "Questions about passages; the answers are brief.\n\n"]
COUNTED = ["steps", "bells", "rooms", "lamps", "benches"]
FILLER = [
    "Fog rolls in from the hills most evenings and lifts again before noon.",
    "The local newspaper is printed once a week and sold at the corner shop.",
    "Sheep graze on the slopes above the road, and their bells can be heard at dusk.",
    "An old canal runs along the eastern edge, though barges rarely use it now.",
    "The bakery closes early on Sundays, when most people visit relatives.",
    "Tourists arrive mostly in late summer, when the festival fills the streets.",
    "A narrow footpath leads from the square down to the riverbank.",
    "The mayor's office keeps a collection of maps drawn by hand.",
    "Cobblestones cover the oldest lane, and carts are not allowed on it.",
    "A bus stops twice a day at the crossroads outside the inn.",
    "Gardens behind the houses grow beans, onions and a few apple trees.",
    "The post arrives by bicycle each morning at about nine.",
]


@dataclass(frozen=True)
class FactPassage:
    context: str  # what the source reads
    continuation: str  # questions and answers about the planted facts, right after the context
    answers: list[tuple[int, int]]  # character spans of the answers in ``continuation``
    shared_chars: int = 0  # the few-shot opening up to the passage ("...\n\nPassage: "); 0 without one


def _fact(rng: random.Random) -> tuple[str, str, str]:
    """(statement, question, answer). Half the statements wrap the answer in more words ("was built in the
    year 1820", "are painted teal") while the answer stays short, and counts have 2 to 4 digits, so that a
    translator learns to carry the answer itself, not one phrasing or one number length."""
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    place, thing = rng.choice(PLACES), rng.choice(THINGS)
    kind = rng.choice(["role", "count", "code", "hometown", "year", "material", "weekday", "shade"])
    wordy = rng.random() < 0.5
    if kind == "role":
        role = rng.choice(ROLES)
        who = f"a person called {name}" if wordy else name
        return f"The {role} of the {thing} at {place} is {who}.", f"Who is the {role} of the {thing} at {place}?", name
    if kind == "count":
        digits = rng.choice((2, 3, 4))
        what, n = rng.choice(COUNTED), str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))
        has = f"has a total of {n} {what}, by the last count" if wordy else f"has {n} {what}"
        return f"The {thing} at {place} {has}.", f"How many {what} does the {thing} at {place} have?", n
    if kind == "code":
        w = rng.choice(WORDS)
        is_w = f"is the word {w}, known to few" if wordy else f"is {w}"
        return (f"The code word for the {thing} at {place} {is_w}.", f"What is the code word for the {thing} at "
                f"{place}?", w)
    if kind == "hometown":
        grew = f"spent a childhood in the village of {place}, far from the sea" if wordy else \
            f"grew up in the village of {place}"
        return f"{name} {grew}.", f"Where did {name} grow up?", place
    if kind == "year":
        y = str(rng.randint(1700, 1899))
        return f"The {thing} at {place} was built in {'the year ' if wordy else ''}{y}.", \
            f"When was the {thing} at {place} built?", y
    if kind == "weekday":
        d = rng.choice(WEEKDAYS)
        opens = f"is open to visitors only on {d}, every week" if wordy else f"is open only on {d}"
        return f"The {thing} at {place} {opens}.", f"On which day is the {thing} at {place} open?", d
    if kind == "shade":
        c = rng.choice(SHADES)
        return f"The shutters of the {thing} at {place} are {'painted ' if wordy else ''}{c}.", \
            f"What colour are the shutters of the {thing} at {place}?", c
    m = rng.choice(MATERIALS)
    made = f"is made of {m}, like most roofs in the district" if wordy else f"is made of {m}"
    return f"The roof of the {thing} at {place} {made}.", f"What is the roof of the {thing} at {place} made of?", m


def _passage(rng: random.Random, facts: tuple[int, int], fillers: tuple[int, int]) -> tuple[str, list]:
    planted = [_fact(rng) for _ in range(rng.randint(*facts))]
    sents = rng.sample(FILLER, rng.randint(*fillers))
    for fact, _, _ in planted:
        sents.insert(rng.randint(0, len(sents)), fact)
    return " ".join(sents), planted


def fact_passages(n: int, seed: int = 0, facts: tuple[int, int] = (1, 4), fillers: tuple[int, int] = (2, 5),
                  few_shot: float = 0.75) -> list[FactPassage]:
    """``n`` passages of ``facts`` (a range) planted facts among ``fillers`` neutral sentences, each followed by
    its questions and answers in shuffled order. With probability ``few_shot`` the context starts like a
    few-shot prompt: an instruction (or none) and a worked passage with one question and its short answer, so
    that the answer format read from the context is part of what the translation has to carry; its
    ``shared_chars`` are that opening up to the passage, what a server would hold in its prefix cache.
    Deterministic in ``seed``."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        head = ""
        if rng.random() < few_shot:
            text, shown = _passage(rng, (1, 1), (1, 2))
            head = f"{rng.choice(INSTRUCTIONS)}Passage: {text}\nQuestion: {shown[0][1]}\nAnswer: {shown[0][2]}\n\n"
        body, planted = _passage(rng, facts, fillers)
        cont, spans = "", []
        for _, q, a in rng.sample(planted, len(planted)):
            cont += f"\nQuestion: {q}\nAnswer: "
            spans.append((len(cont), len(cont) + len(a)))
            cont += a + "\n"
        shared = len(head) + len("Passage: ") if head else 0
        out.append(FactPassage(head + "Passage: " + body, cont, spans, shared))
    return out


def answer_mask(tokenizer, continuation: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Token ids of ``continuation`` (no special tokens) and, per token, whether it overlaps an answer span."""
    enc = tokenizer(continuation, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(b < e2 and e > b2 for b2, e2 in spans) for b, e in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask
