"""The passage QA set: planted facts, questions and exact-match scoring."""

from __future__ import annotations

import pytest
from kvhelpers import one_thread

from kvforge import prefill
from kvforge.eval.qa import answer_in_reply, exact_match, first_phrase, normalize, qa_exact_match, qa_set


def test_set_is_deterministic_and_every_answer_is_in_its_passage_once():
    items = qa_set(60, seed=3)
    assert items == qa_set(60, seed=3) and items != qa_set(60, seed=4)
    assert len({i.kind for i in items}) == 6
    for item in items:
        assert item.passage.count(item.answer) == 1, item
        assert item.answer not in item.question
        assert item.context.endswith(item.passage) and item.prompt.endswith("Answer:")
    with pytest.raises(ValueError, match="at least 1"):
        qa_set(0)


@pytest.mark.parametrize(("prediction", "answer", "ok"), [
    (" Edda Quill\nQuestion: who", "Edda Quill", True),
    (" The answer is: Red.\n", "red", True),
    (" 24.\nQuestion", "24", True),
    (" The Marigold, I think", "marigold", True),
    (" In the month of August.", "August", False),  # exact match: extra words fail
    (" 2\nThe answer is: 24", "24", False),
    ("", "24", False),
])
def test_exact_match_normalises_like_squad_and_reads_only_the_first_phrase(prediction, answer, ok):
    assert exact_match(prediction, answer) is ok


@pytest.mark.parametrize(("prediction", "answer", "ok"), [
    (" In the month of August.\nQuestion", "August", True),  # carried, phrased as a sentence
    (" He is a man named Dorian Crane.", "Dorian Crane", True),
    (" The password is 1234\njuniper", "juniper", False),  # only the first line counts
    (" 455", "45", False),  # whole words only
    (" Mirela V", "Mirela Vey", False),
    ("", "red", False),
])
def test_answer_in_reply_finds_a_phrased_answer_in_the_first_line_only(prediction, answer, ok):
    assert answer_in_reply(prediction, answer) is ok


def test_normalize_and_first_phrase():
    assert normalize("  The  Clock-Tower!") == "clocktower"
    assert first_phrase("Answer: Dunlow, of course") == "Dunlow"


def test_scoring_runs_any_past(tiny):
    """Each item is answered from the state the caller gives (here the model's own prefill, or nothing)."""
    model, tok = tiny
    items = qa_set(2)
    with one_thread():
        own = qa_exact_match(model, tok, items, lambda it: prefill(model, tok, it.context), max_new_tokens=3)
        none = qa_exact_match(model, tok, items, lambda it: None, max_new_tokens=3)
    assert own.total == none.total == 2 and len(own.predictions) == 2
    assert own.correct == sum(exact_match(p, i.answer) for p, i in zip(own.predictions, items))
