"""The reference pre-allocated cache: exactness, overflow, the transformers layer API, generate()."""

from __future__ import annotations

import pytest
import torch
from kvhelpers import CONTEXT, QUESTION, forward_into, hf_greedy, ids_of, one_thread, prefilled_cache
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from kvforge import CacheOverflowError, KVState, PreallocatedCache, PreallocatedLayer, generate, prefill
from kvforge.models import text_config

N_NEW = 12


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def _num_layers(model) -> int:
    return text_config(model).num_hidden_layers


# ----------------------------------------------------------------------------- exactness in a model
def test_same_greedy_tokens_as_no_cache_and_dynamic_cache(tiny):
    model, tok = tiny
    ids = ids_of(tok, CONTEXT)  # longer than the tiny Gemma's sliding window
    n = ids.shape[1]
    nocache = generate(model, tok, ids, max_new_tokens=N_NEW, use_cache=False, stop_at_eos=False)
    dynamic = generate(model, tok, ids, max_new_tokens=N_NEW, stop_at_eos=False)
    cache = PreallocatedCache(model, n + N_NEW)
    pre = generate(model, tok, ids, max_new_tokens=N_NEW, cache=cache, stop_at_eos=False)
    assert pre.token_ids == dynamic.token_ids == nocache.token_ids
    assert pre.stats["cache"] == "PreallocatedCache"
    # every fed token is held (the last generated token is never fed back); sliding layers keep them all
    assert cache.get_seq_length() == n + N_NEW - 1
    assert all(layer.length == n + N_NEW - 1 for layer in cache.layers)
    assert pre.forwarded_tokens == dynamic.forwarded_tokens == n + N_NEW - 1


def test_logits_match_dynamic_cache_step_by_step(tiny):
    model, tok = tiny
    ids = ids_of(tok, CONTEXT)
    pre, dyn = PreallocatedCache(model, 128), DynamicCache(config=model.config)
    a = forward_into(model, pre, ids[:, :30]).logits
    b = forward_into(model, dyn, ids[:, :30]).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for i in range(30, ids.shape[1]):  # one token at a time, well past the sliding window
        a = forward_into(model, pre, ids[:, i : i + 1], i).logits
        b = forward_into(model, dyn, ids[:, i : i + 1], i).logits
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # full-attention layers hold what DynamicLayer holds (up to float rounding from earlier layers)
    for pl, dl in zip(pre.layers, dyn.layers):
        if not getattr(dl, "is_sliding", False):
            torch.testing.assert_close(pl.keys, dl.keys, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- overflow
def test_overflow_raises_and_drops_nothing(tiny):
    model, tok = tiny
    ids = ids_of(tok, CONTEXT)
    cache = PreallocatedCache(model, 40)
    forward_into(model, cache, ids[:, :30])
    held = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]

    with pytest.raises(CacheOverflowError, match="max_seq_len=40") as e:
        forward_into(model, cache, ids[:, 30:45], 30)
    assert "30 tokens held + 15 new" in str(e.value)
    # nothing was written or dropped: every layer still holds exactly the first 30 tokens
    assert cache.get_seq_length() == 30
    for layer, (k, v) in zip(cache.layers, held):
        assert layer.length == 30 and torch.equal(layer.keys, k) and torch.equal(layer.values, v)

    # the cache is still usable up to its capacity, and agrees with a DynamicCache
    a = forward_into(model, cache, ids[:, 30:40], 30).logits
    dyn = prefilled_cache(model, ids[:, :30])
    b = forward_into(model, dyn, ids[:, 30:40], 30).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == 40
    with pytest.raises(CacheOverflowError):
        forward_into(model, cache, ids[:, 40:41], 40)


def test_generate_past_capacity_raises_instead_of_truncating(tiny):
    model, tok = tiny
    ids = ids_of(tok, CONTEXT)
    with pytest.raises(CacheOverflowError, match="max_seq_len"):
        generate(model, tok, ids, max_new_tokens=5, cache=PreallocatedCache(model, ids.shape[1] + 2), stop_at_eos=False)
    with pytest.raises(CacheOverflowError):
        hf_greedy(model, ids, 5, cache=PreallocatedCache(model, ids.shape[1] + 2))


def test_invalid_capacity():
    with pytest.raises(ValueError, match="max_seq_len"):
        PreallocatedLayer(0)


# ----------------------------------------------------------------------------- layer API vs DynamicLayer
def _pair(batch=3, heads=2, tokens=10, dim=8, capacity=64):
    """A PreallocatedLayer and a DynamicLayer holding the same random tokens, plus a token source."""
    gen = torch.Generator().manual_seed(0)

    def kv(n, b=batch):
        return torch.randn(b, heads, n, dim, generator=gen), torch.randn(b, heads, n, dim, generator=gen)

    pre, dyn = PreallocatedLayer(capacity), DynamicLayer()
    k, v = kv(tokens)
    rk, rv = pre.update(k, v)
    dk, dv = dyn.update(k, v)
    assert torch.equal(rk, dk) and torch.equal(rv, dv)
    return pre, dyn, kv


def _assert_same(pre: PreallocatedLayer, dyn: DynamicLayer) -> None:
    assert pre.get_seq_length() == dyn.get_seq_length()
    assert torch.equal(pre.keys, dyn.keys) and torch.equal(pre.values, dyn.values)


def _append_and_compare(pre, dyn, kv, n=3) -> None:
    """After an operation, new tokens must land right after the held ones in both layers."""
    b = dyn.keys.shape[0]
    k, v = kv(n, b)
    rk, rv = pre.update(k, v)
    dk, dv = dyn.update(k, v)
    assert torch.equal(rk, dk) and torch.equal(rv, dv)
    _assert_same(pre, dyn)


def test_update_returns_all_held_tokens_like_dynamic_layer():
    pre, dyn, kv = _pair()
    _assert_same(pre, dyn)
    for n in (1, 1, 5):
        _append_and_compare(pre, dyn, kv, n)
    assert pre.get_mask_sizes(1) == dyn.get_mask_sizes(1)
    assert pre.get_max_length() == 64 and dyn.get_max_length() == -1


@pytest.mark.parametrize(
    ("op", "batch"),
    [
        (lambda layer: layer.crop(-1), 3),
        (lambda layer: layer.crop(-4), 3),
        (lambda layer: layer.crop(-10), 3),
        (lambda layer: layer.crop(0), 3),
        (lambda layer: layer.reorder_cache(torch.tensor([2, 0, 0])), 3),
        (lambda layer: layer.batch_repeat_interleave(2), 6),
        (lambda layer: layer.batch_select_indices(torch.tensor([0, 2])), 2),
        (lambda layer: layer.batch_select_indices(torch.tensor([True, False, True])), 2),
    ],
    ids=["crop-1", "crop-4", "crop-10", "crop0", "reorder", "repeat", "select-idx", "select-mask"],
)
def test_layer_operations_like_dynamic_layer(op, batch):
    pre, dyn, kv = _pair()
    op(pre)
    op(dyn)
    _assert_same(pre, dyn)
    assert pre.keys.shape[0] == batch
    _append_and_compare(pre, dyn, kv)


def test_legacy_positive_crop_is_a_length_to_keep():
    pre, dyn, kv = _pair()
    # a positive value is transformers' legacy "length to keep"; DynamicLayer now rejects it
    pre.crop(7)
    dyn.crop(-3)
    _assert_same(pre, dyn)
    _append_and_compare(pre, dyn, kv)


def test_reset_and_empty_layer():
    pre, dyn, kv = _pair()
    pre.reset()
    dyn.reset()
    assert pre.get_seq_length() == dyn.get_seq_length() == 0
    pre.update(*kv(4))  # writes start again at position 0
    assert pre.get_seq_length() == 4 and pre.keys.shape[2] == 4

    empty = PreallocatedLayer(8)
    empty.reorder_cache(torch.tensor([0]))  # operations on a layer that holds nothing are no-ops
    empty.batch_repeat_interleave(2)
    empty.crop(-1)
    assert empty.get_seq_length() == 0 and empty.nbytes == 0


def test_nbytes_is_the_allocated_capacity(tiny):
    model, tok = tiny
    cache = PreallocatedCache(model, 100)
    assert cache.nbytes == 0  # allocated lazily, on the first update
    forward_into(model, cache, ids_of(tok, "hello"))
    cfg = text_config(model)
    per_layer = 2 * cfg.num_key_value_heads * 100 * cfg.head_dim * 4
    assert cache.nbytes == _num_layers(model) * per_layer


# ----------------------------------------------------------------------------- transformers generate()
@pytest.mark.parametrize("num_beams", [1, 2])
def test_transformers_generate_matches_dynamic_cache(tiny, num_beams):
    model, tok = tiny
    ids = ids_of(tok, CONTEXT)
    kwargs = {"num_beams": num_beams, "num_return_sequences": num_beams}
    dyn = hf_greedy(model, ids, N_NEW, cache=DynamicCache(config=model.config), **kwargs)
    pre = hf_greedy(model, ids, N_NEW, cache=PreallocatedCache(model, ids.shape[1] + N_NEW), **kwargs)
    assert pre.shape == (num_beams, N_NEW)
    assert torch.equal(pre, dyn)


# ----------------------------------------------------------------------------- KVState round trip
def test_import_dense_state_into_preallocated_cache(tiny_llama):
    model, tok = tiny_llama
    ids = ids_of(tok, CONTEXT)
    state = prefill(model, tok, ids)  # from a DynamicCache
    n = ids.shape[1]
    cache = state.to_cache(model, cache=PreallocatedCache(model, n + 32))
    assert isinstance(cache, PreallocatedCache) and cache.get_seq_length() == n
    for layer, cl in zip(state.layers, cache.layers):
        assert torch.equal(cl.keys, layer.keys) and torch.equal(cl.values, layer.values)

    ref = generate(model, tok, QUESTION, max_new_tokens=N_NEW, state=state, stop_at_eos=False)
    res = generate(model, tok, QUESTION, max_new_tokens=N_NEW, state=state,
                   cache=PreallocatedCache(model, n + 32), stop_at_eos=False)
    assert res.token_ids == ref.token_ids
    assert res.forwarded_tokens == ref.forwarded_tokens

    with pytest.raises(CacheOverflowError):
        state.to_cache(model, cache=PreallocatedCache(model, n - 1))


def test_preallocated_state_round_trip(tiny, tmp_path):
    """Prefill into a PreallocatedCache, export, save, load, import into a fresh PreallocatedCache."""
    model, tok = tiny
    ids = ids_of(tok, CONTEXT)
    n = ids.shape[1]
    src = PreallocatedCache(model, n + 32)
    state = prefill(model, tok, ids, cache=src)
    # the pre-allocated cache keeps every token, sliding layers included
    assert all(layer.length == n for layer in state.layers)
    for layer, cl in zip(state.layers, src.layers):
        assert torch.equal(layer.keys, cl.keys)
    loaded = KVState.load(state.save(tmp_path / "pre.kv"), model=model)

    into_pre = generate(model, tok, QUESTION, max_new_tokens=N_NEW, state=loaded,
                        cache=PreallocatedCache(model, n + 32), stop_at_eos=False)
    into_dyn = generate(model, tok, QUESTION, max_new_tokens=N_NEW, state=loaded, stop_at_eos=False)
    q = ids_of(tok, QUESTION, special=False)
    uninterrupted = generate(model, tok, torch.cat([ids, q], 1), max_new_tokens=N_NEW, stop_at_eos=False)
    assert into_pre.token_ids == into_dyn.token_ids == uninterrupted.token_ids


def test_exported_state_does_not_alias_the_preallocated_buffer(tiny):
    model, tok = tiny
    ids = ids_of(tok, CONTEXT)
    cache = PreallocatedCache(model, 128)
    state = prefill(model, tok, ids, cache=cache)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in state.layers]
    cache.crop(-10)  # then overwrite the freed slots in place with other tokens
    forward_into(model, cache, ids_of(tok, "0123456789", special=False), ids.shape[1] - 10)
    assert cache.get_seq_length() == ids.shape[1]
    assert not torch.equal(cache.layers[-1].keys, before[-1][0])
    for layer, (k, v) in zip(state.layers, before):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)


def test_window_truncated_state_cannot_fill_a_preallocated_cache(tiny_gemma):
    model, tok = tiny_gemma
    ids = ids_of(tok, CONTEXT)
    state = prefill(model, tok, ids)  # DynamicCache: sliding layers keep only window-1 tokens
    with pytest.raises(ValueError, match="needs all"):
        state.to_cache(model, cache=PreallocatedCache(model, ids.shape[1] + 8))
