"""The reference generation loop: cache on/off, sampling, token counting, continuing from a state."""

from __future__ import annotations

import pytest
import torch
from kvhelpers import CONTEXT, QUESTION, ids_of, one_thread

from kvforge import generate, prefill
from kvforge.generate import TokenCounter
from kvforge.run import sample_next

N_NEW = 16


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def test_use_cache_true_and_false_pick_the_same_greedy_tokens(tiny):
    model, tok = tiny
    a = generate(model, tok, CONTEXT, max_new_tokens=N_NEW, use_cache=True, stop_at_eos=False)
    b = generate(model, tok, CONTEXT, max_new_tokens=N_NEW, use_cache=False, stop_at_eos=False)
    assert a.token_ids == b.token_ids and len(a.token_ids) == N_NEW
    assert a.text == b.text == tok.decode(a.token_ids)
    n = len(CONTEXT) + 1  # CharTokenizer: one token per byte, plus BOS
    assert a.prompt_tokens == b.prompt_tokens == n
    # with a cache each step feeds one token; without, each step re-reads the whole sequence
    assert a.forwarded_tokens == n + N_NEW - 1
    assert b.forwarded_tokens == sum(n + i for i in range(N_NEW))
    assert a.stats["cache"] == "DynamicCache" and b.stats["cache"] is None
    assert 0 < a.first_token_seconds <= a.seconds
    assert a.tokens_per_second == pytest.approx(N_NEW / a.seconds)


def test_prompt_as_text_or_ids_is_the_same(tiny):
    model, tok = tiny
    a = generate(model, tok, CONTEXT, max_new_tokens=8, stop_at_eos=False)
    ids = ids_of(tok, CONTEXT)
    b = generate(model, tok, ids, max_new_tokens=8, stop_at_eos=False)
    c = generate(model, tok, ids[0], max_new_tokens=8, stop_at_eos=False)  # 1-D ids
    assert a.token_ids == b.token_ids == c.token_ids


def test_sampling_with_a_seed_is_reproducible(tiny):
    model, tok = tiny
    kw = {"max_new_tokens": N_NEW, "temperature": 1.0, "top_p": 0.95, "stop_at_eos": False}
    a = generate(model, tok, CONTEXT, seed=7, **kw)
    b = generate(model, tok, CONTEXT, seed=7, **kw)
    assert a.token_ids == b.token_ids
    others = {tuple(generate(model, tok, CONTEXT, seed=s, **kw).token_ids) for s in (8, 9, 10)}
    assert others - {tuple(a.token_ids)}, "different seeds should sample different sequences"
    greedy = generate(model, tok, CONTEXT, max_new_tokens=N_NEW, stop_at_eos=False)
    assert a.token_ids != greedy.token_ids  # temperature 1 really samples


@pytest.mark.parametrize("top_p", [0.0, -0.5, 1.01, 2.0])
def test_top_p_out_of_range_is_rejected(tiny_llama, top_p):
    model, tok = tiny_llama
    with pytest.raises(ValueError, match="top_p"):
        generate(model, tok, "hi", max_new_tokens=2, temperature=1.0, top_p=top_p)


def test_invalid_arguments(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tok, "hi", max_new_tokens=-1)
    with pytest.raises(ValueError, match="empty"):
        generate(model, tok, torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)
    state = prefill(model, tok, "context")
    with pytest.raises(ValueError, match="use_cache"):
        generate(model, tok, "hi", max_new_tokens=2, state=state, use_cache=False)
    none = generate(model, tok, "hi", max_new_tokens=0)
    assert none.token_ids == [] and none.forwarded_tokens == 0


def test_sample_next():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.3, 0.15]]))
    assert sample_next(logits, 0.0, 1.0).tolist() == [1]  # greedy
    gen = torch.Generator().manual_seed(0)
    # a tiny nucleus keeps only the most likely token
    assert {int(sample_next(logits, 1.0, 1e-6, gen)) for _ in range(50)} == {1}
    # top_p=0.7 keeps {1, 2} (0.5 + 0.3 reaches 0.7); 0.85 also keeps 3; 1.0 keeps everything
    assert {int(sample_next(logits, 1.0, 0.7, gen)) for _ in range(300)} == {1, 2}
    assert {int(sample_next(logits, 1.0, 0.85, gen)) for _ in range(300)} == {1, 2, 3}
    assert {int(sample_next(logits, 1.0, 1.0, gen)) for _ in range(600)} == {0, 1, 2, 3}
    # batched: one token per row
    two = torch.stack([logits[0], logits[0].flip(0)])
    assert sample_next(two, 0.0, 1.0).tolist() == [1, 2]


def test_token_counter(tiny_llama):
    model, tok = tiny_llama
    with torch.inference_mode():
        with TokenCounter(model) as counter:
            model(input_ids=torch.ones(2, 7, dtype=torch.long))
            model(input_ids=torch.ones(1, 3, dtype=torch.long))
            assert counter.count == 17
        model(input_ids=torch.ones(1, 5, dtype=torch.long))  # after close: not counted
    assert counter.count == 17


def test_continuing_from_a_state_forwards_only_prompt_and_new_tokens(tiny):
    model, tok = tiny
    state = prefill(model, tok, CONTEXT)
    res = generate(model, tok, QUESTION, max_new_tokens=N_NEW, state=state, stop_at_eos=False)
    assert res.prompt_tokens == len(QUESTION)  # no second BOS in a continuation
    assert len(res.token_ids) == N_NEW
    assert res.forwarded_tokens == len(QUESTION) + N_NEW - 1
    assert res.stats["prefix_tokens"] == state.num_tokens == len(CONTEXT) + 1

    # the same as re-reading context + question from scratch
    q = ids_of(tok, QUESTION, special=False)
    full = generate(model, tok, torch.cat([ids_of(tok, CONTEXT), q], 1), max_new_tokens=N_NEW, stop_at_eos=False)
    assert res.token_ids == full.token_ids
    assert full.forwarded_tokens == state.num_tokens + len(QUESTION) + N_NEW - 1
    # the state itself is not consumed: continuing twice gives the same tokens
    again = generate(model, tok, QUESTION, max_new_tokens=N_NEW, state=state, stop_at_eos=False)
    assert again.token_ids == res.token_ids


def test_stops_at_eos(tiny_llama, monkeypatch):
    model, tok = tiny_llama
    free = generate(model, tok, CONTEXT, max_new_tokens=N_NEW, stop_at_eos=False)
    stop_tok = free.token_ids[3]
    first = free.token_ids.index(stop_tok)
    monkeypatch.setattr(model.generation_config, "eos_token_id", stop_tok)
    stopped = generate(model, tok, CONTEXT, max_new_tokens=N_NEW)
    assert stopped.token_ids == free.token_ids[: first + 1]
    ignored = generate(model, tok, CONTEXT, max_new_tokens=N_NEW, stop_at_eos=False)
    assert ignored.token_ids == free.token_ids
