"""KVState on the tiny models: export/import, save/load, slicing, concat, describe, batches."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from kvhelpers import (
    CONTEXT,
    QUESTION,
    forward_into,
    greedy_continue,
    hf_greedy,
    ids_of,
    one_thread,
    prefilled_cache,
)
from safetensors import safe_open
from safetensors.torch import save_file

from kvforge import KVFileError, KVState, KVStateError, ModelMismatchError, fingerprint, generate, prefill
from kvforge.models import layer_types, text_config

N_NEW = 12


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def _kv_heads(model) -> int:
    return text_config(model).num_key_value_heads


def _window(model) -> int | None:
    return getattr(text_config(model), "sliding_window", None)


def _is_sliding(model, i: int) -> bool:
    return layer_types(model)[i] == "sliding_attention"


@pytest.fixture
def ctx(tiny):
    """``(model, tok, context ids, state exported after a one-pass prefill)``."""
    model, tok = tiny
    ids = ids_of(tok, CONTEXT)
    state = KVState.from_cache(prefilled_cache(model, ids), model, ids)
    return model, tok, ids, state


def _assert_states_equal(a: KVState, b: KVState) -> None:
    assert len(a.layers) == len(b.layers)
    for la, lb in zip(a.layers, b.layers):
        assert la.kind == lb.kind and la.length == lb.length and la.meta == lb.meta
        assert set(la.tensors) == set(lb.tensors)
        for name in la.tensors:
            assert la.tensors[name].dtype == lb.tensors[name].dtype
            assert torch.equal(la.tensors[name], lb.tensors[name]), name
    assert torch.equal(a.token_ids, b.token_ids)
    assert torch.equal(a.positions, b.positions)
    if a.attention_mask is None:
        assert b.attention_mask is None
    else:
        assert torch.equal(a.attention_mask, b.attention_mask)
    for attr in ("layer_types", "fingerprint", "model_name", "sliding_window", "layer_indices",
                 "num_model_layers", "meta"):
        assert getattr(a, attr) == getattr(b, attr), attr


# ----------------------------------------------------------------------------- export / import
def test_context_is_longer_than_the_sliding_window(tiny_gemma):
    model, tok = tiny_gemma
    assert ids_of(tok, CONTEXT).shape[1] > 2 * _window(model)


def test_export_equals_cache_tensors_bit_for_bit(tiny):
    model, tok = tiny
    ids = ids_of(tok, CONTEXT)
    n = ids.shape[1]
    cache = prefilled_cache(model, ids)
    state = KVState.from_cache(cache, model, ids)

    assert state.num_tokens == n and state.batch_size == 1
    assert state.fingerprint == fingerprint(model)
    assert state.layer_types == layer_types(model)
    assert torch.equal(state.positions, torch.arange(n))
    for i, (layer, cl) in enumerate(zip(state.layers, cache.layers)):
        assert layer.kind == "dense"
        assert torch.equal(layer.keys, cl.keys) and torch.equal(layer.values, cl.values)
        assert layer.keys.shape[1] == _kv_heads(model)
        # sliding layers hold only the last window-1 tokens; full layers hold every token
        expected = _window(model) - 1 if _is_sliding(model, i) else n
        assert layer.length == expected == layer.keys.shape[2]

    # the export is a copy: the cache moving on, or being overwritten in place, leaves the state as it was
    before = [(layer.keys.clone(), layer.values.clone()) for layer in state.layers]
    with torch.inference_mode():
        for cl in cache.layers:
            cl.keys.zero_()
            cl.values.zero_()
    forward_into(model, cache, ids_of(tok, "xyz", special=False), n)
    assert cache.get_seq_length() == n + 3
    for layer, (k, v) in zip(state.layers, before):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)


def test_import_puts_the_same_tensors_back(ctx):
    model, _, ids, state = ctx
    cache = state.to_cache(model)
    assert cache.get_seq_length() == ids.shape[1]  # sliding layers count tokens seen, not kept
    for layer, cl in zip(state.layers, cache.layers):
        assert torch.equal(cl.keys, layer.keys) and torch.equal(cl.values, layer.values)
    with pytest.raises(KVStateError, match="empty"):
        state.to_cache(model, cache=cache)  # importing into a cache that already holds tokens


def test_continue_from_exported_state_matches_uninterrupted_run(tiny):
    model, tok = tiny
    ids = ids_of(tok, CONTEXT)
    q = ids_of(tok, QUESTION, special=False)
    cache = prefilled_cache(model, ids)
    state = KVState.from_cache(cache, model, ids)

    # uninterrupted: the same cache continues, never exported
    ref = greedy_continue(model, cache, ids.shape[1], q, N_NEW)[0].tolist()

    res = generate(model, tok, QUESTION, max_new_tokens=N_NEW, state=state, stop_at_eos=False)
    assert res.token_ids == ref
    assert res.prompt_tokens == q.shape[1]
    assert res.forwarded_tokens == q.shape[1] + N_NEW - 1  # the context never went through the model again

    hf = hf_greedy(model, torch.cat([ids, q], 1), N_NEW, cache=state.to_cache(model))
    assert hf[0].tolist() == ref

    # and a full re-read without any cache agrees too
    nocache = generate(model, tok, torch.cat([ids, q], 1), max_new_tokens=N_NEW, use_cache=False, stop_at_eos=False)
    assert nocache.token_ids == ref


def test_chunked_prefill_matches_one_pass(tiny):
    model, tok = tiny
    ids = ids_of(tok, CONTEXT)
    one = prefill(model, tok, ids)
    chunked = prefill(model, tok, ids, chunk_size=10)  # chunk < sliding window; many chunks past it
    assert [layer.length for layer in one.layers] == [layer.length for layer in chunked.layers]
    for a, b in zip(one.layers, chunked.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)
    _assert_same_continuation(model, tok, one, chunked)


def test_from_cache_rejects_wrong_token_count(tiny):
    model, tok = tiny
    ids = ids_of(tok, CONTEXT)
    cache = prefilled_cache(model, ids)
    with pytest.raises(KVStateError, match="has seen"):
        KVState.from_cache(cache, model, ids[:, :-1])


# ----------------------------------------------------------------------------- save / load
def test_save_load_round_trip_is_exact(ctx, tmp_path):
    model, tok, ids, state = ctx
    state.meta = {"note": "round trip", "n": 3}
    state.attention_mask = torch.ones_like(state.token_ids)
    path = state.save(tmp_path / "sub" / "ctx.kv")
    assert path.exists() and not path.with_name("ctx.kv.tmp").exists()

    loaded = KVState.load(path, model=model)
    _assert_states_equal(state, loaded)

    # the loaded state continues exactly like the original
    a = generate(model, tok, QUESTION, max_new_tokens=N_NEW, state=state, stop_at_eos=False)
    b = generate(model, tok, QUESTION, max_new_tokens=N_NEW, state=loaded, stop_at_eos=False)
    assert a.token_ids == b.token_ids


def test_save_load_of_sliced_state(ctx, tmp_path):
    _, _, _, state = ctx
    part = state.select_layers([0, len(state) - 1])[3:9]
    loaded = KVState.load(part.save(tmp_path / "part.kv"))
    _assert_states_equal(part, loaded)
    assert loaded.layer_indices == [0, len(state) - 1]


def test_load_into_a_different_model_raises(tiny_llama, tiny_gemma, tmp_path):
    (llama, tok), (gemma, _) = tiny_llama, tiny_gemma
    ids = ids_of(tok, CONTEXT)
    state = prefill(llama, tok, ids)
    path = state.save(tmp_path / "ctx.kv")
    with pytest.raises(ModelMismatchError) as e:
        KVState.load(path, model=gemma)
    msg = str(e.value)
    assert fingerprint(llama) in msg and fingerprint(gemma) in msg
    assert "tiny-llama" in msg and "tiny-gemma" in msg
    with pytest.raises(ModelMismatchError):
        state.to_cache(gemma)


def test_same_architecture_other_weights_is_a_mismatch(tiny_llama):
    from conftest import _llama

    model, tok = tiny_llama
    assert fingerprint(_llama()) == fingerprint(model)  # same seed, same weights, same fingerprint
    other = _llama()
    with torch.no_grad():
        other.model.embed_tokens.weight[5, 0] += 1.0  # one weight differs (before it is fingerprinted)
    assert fingerprint(other) != fingerprint(model)
    state = prefill(model, tok, ids_of(tok, CONTEXT))
    with pytest.raises(ModelMismatchError):
        state.to_cache(other)
    state.to_cache(other, check=False)  # explicitly unchecked import is allowed


def test_truncated_file_raises(ctx, tmp_path):
    *_, state = ctx
    path = state.save(tmp_path / "ctx.kv")
    data = path.read_bytes()
    for keep in (len(data) // 2, len(data) - 1, 5):
        bad = tmp_path / f"cut{keep}.kv"
        bad.write_bytes(data[:keep])
        with pytest.raises(KVFileError):
            KVState.load(bad)


def test_flipped_byte_in_tensor_data_fails_integrity_check(ctx, tmp_path):
    *_, state = ctx
    path = state.save(tmp_path / "ctx.kv")
    data = bytearray(path.read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_len])
    begin, end = header["layers.0.values"]["data_offsets"]
    data[8 + header_len + (begin + end) // 2] ^= 0x40
    bad = tmp_path / "flipped.kv"
    bad.write_bytes(bytes(data))
    with pytest.raises(KVFileError, match="integrity"):
        KVState.load(bad)
    # verification can be switched off; the damaged tensor then differs from the original
    loaded = KVState.load(bad, verify=False)
    assert not torch.equal(loaded.layers[0].values, state.layers[0].values)
    assert torch.equal(loaded.layers[0].keys, state.layers[0].keys)


def _rewrite_metadata(src, dst, edit) -> None:
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta["kvforge"])
    edit(header)
    save_file(tensors, str(dst), metadata={"kvforge": json.dumps(header)})


def test_newer_format_version_raises(ctx, tmp_path):
    *_, state = ctx
    path = state.save(tmp_path / "ctx.kv")
    newer = tmp_path / "v99.kv"
    _rewrite_metadata(path, newer, lambda h: h.update(format_version=99))
    with pytest.raises(KVFileError, match="newer") as e:
        KVState.load(newer)
    assert "99" in str(e.value)
    # control: rewriting without a change loads fine (the rewrite itself is sound)
    same = tmp_path / "same.kv"
    _rewrite_metadata(path, same, lambda h: None)
    _assert_states_equal(state, KVState.load(same))


def test_other_format_name_raises(ctx, tmp_path):
    *_, state = ctx
    path = state.save(tmp_path / "ctx.kv")
    other = tmp_path / "other.kv"
    _rewrite_metadata(path, other, lambda h: h.update(format="something.else"))
    with pytest.raises(KVFileError, match="not a kvforge"):
        KVState.load(other)


def test_non_kvforge_safetensors_file_raises(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(3, 4)}, str(path), metadata={"format": "pt"})
    with pytest.raises(KVFileError, match="not a kvforge"):
        KVState.load(path)


def test_garbage_and_missing_files_raise(tmp_path):
    garbage = tmp_path / "garbage.kv"
    garbage.write_bytes(b"this is not a safetensors file at all" * 10)
    with pytest.raises(KVFileError):
        KVState.load(garbage)
    with pytest.raises(KVFileError, match="no such file"):
        KVState.load(tmp_path / "missing.kv")


# ----------------------------------------------------------------------------- slicing
def test_select_layers(ctx):
    model, _, _, state = ctx
    last = len(state) - 1
    sub = state.select_layers([0, last])
    assert sub.layer_indices == [0, last]
    assert sub.layer_types == [state.layer_types[0], state.layer_types[last]]
    assert sub.layers[1] is state.layers[last]
    assert sub.num_model_layers == state.num_model_layers == len(layer_types(model))
    assert state.select_layers(1).layer_indices == [1]
    assert state.select_layers(slice(1, None)).layer_indices == list(range(1, len(state)))
    # indices refer to the sliced state
    assert sub.select_layers([1]).layer_indices == [last]
    with pytest.raises(KVStateError, match="out of range"):
        state.select_layers([len(state)])
    with pytest.raises(KVStateError, match="every layer"):
        sub.to_cache(model)
    with pytest.raises(TypeError):
        state[0]  # ints do not index layers


def test_select_tokens_of_full_layers(ctx):
    model, _, ids, state = ctx
    part = state[5:20]
    assert part.num_tokens == 15
    assert torch.equal(part.token_ids, ids[:, 5:20])
    assert torch.equal(part.positions, torch.arange(5, 20))
    for i, (a, b) in enumerate(zip(state.layers, part.layers)):
        if not _is_sliding(model, i):
            assert torch.equal(b.keys, a.keys[:, :, 5:20]) and torch.equal(b.values, a.values[:, :, 5:20])
    assert state[-4:].num_tokens == 4
    with pytest.raises(KVStateError, match="empty"):
        state[10:10]
    with pytest.raises(KVStateError, match="step"):
        state[::2]


def test_split_then_concat_is_the_original(ctx):
    model, _, ids, state = ctx
    n = ids.shape[1]
    # a tail that fits the sliding window keeps every layer complete; full attention splits anywhere
    cuts = [n - 10, n - 1] if _window(model) else [1, 7, 30, n - 1]
    for cut in cuts:
        _assert_states_equal(state, KVState.concat([state[:cut], state[cut:]]))
    if not _window(model):
        _assert_states_equal(state, KVState.concat([state[:7], state[7:30], state[30:]]))


def test_concat_rejects_a_tail_missing_sliding_tokens(tiny_gemma):
    model, tok = tiny_gemma
    ids = ids_of(tok, CONTEXT)
    state = prefill(model, tok, ids)
    with pytest.raises(KVStateError, match="missing tokens"):
        KVState.concat([state[:7], state[7:]])  # the tail's sliding layers hold only window-1 tokens


def test_concat_errors(ctx, tiny_llama, tiny_gemma):
    model, tok, ids, state = ctx
    with pytest.raises(KVStateError, match="positions do not continue"):
        KVState.concat([state[:10], state[12:]])
    with pytest.raises(KVStateError, match="nothing"):
        KVState.concat([])
    other_model = tiny_gemma[0] if model.kvforge_name == "tiny-llama" else tiny_llama[0]
    other = prefill(other_model, tok, ids)
    with pytest.raises(ModelMismatchError):
        KVState.concat([state, other])
    with pytest.raises(KVStateError, match="different layers"):
        KVState.concat([state.select_layers([0])[:10], state.select_layers([1])[10:]])


def test_prefix_state_plus_continuation_state_generates_identically(tiny):
    model, tok = tiny
    full_ids = ids_of(tok, CONTEXT)
    n, cut = full_ids.shape[1], full_ids.shape[1] - 12  # prefix > sliding window; continuation < window
    prefix = prefill(model, tok, full_ids[:, :cut])

    # continue the prefix in its own cache and export only the continuation's tokens
    cache = prefix.to_cache(model)
    forward_into(model, cache, full_ids[:, cut:], cut)
    continuation = KVState.from_cache(cache, model, full_ids)[cut:]
    assert continuation.num_tokens == n - cut
    assert torch.equal(continuation.positions, torch.arange(cut, n))

    joined = KVState.concat([prefix, continuation])
    assert joined.num_tokens == n and torch.equal(joined.token_ids, full_ids)
    one_pass = prefill(model, tok, full_ids)
    for a, b in zip(joined.layers, one_pass.layers):
        # a sliding layer of the join may hold more than the window needs; its last tokens match
        assert a.length >= b.length
        torch.testing.assert_close(a.keys[:, :, -b.length :], b.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.values[:, :, -b.length :], b.values, atol=1e-5, rtol=1e-5)

    _assert_same_continuation(model, tok, joined, one_pass)


def test_token_prefix_of_full_attention_state_continues_like_its_own_prefill(tiny_llama):
    model, tok = tiny_llama
    ids = ids_of(tok, CONTEXT)
    state = prefill(model, tok, ids)
    a = generate(model, tok, QUESTION, max_new_tokens=N_NEW, state=state[:40], stop_at_eos=False)
    b = generate(model, tok, QUESTION, max_new_tokens=N_NEW, state=prefill(model, tok, ids[:, :40]), stop_at_eos=False)
    assert a.token_ids == b.token_ids


def test_token_slice_missing_sliding_tokens_cannot_be_imported(tiny_gemma):
    model, tok = tiny_gemma
    ids = ids_of(tok, CONTEXT)
    state = prefill(model, tok, ids)
    window = _window(model)
    head = state[: ids.shape[1] - 5]  # the sliding layers held only the last window-1 tokens
    sliding = [i for i in range(len(state)) if _is_sliding(model, i)]
    assert sliding and all(head.layers[i].length < window - 1 for i in sliding)
    with pytest.raises(KVStateError, match="sliced by tokens"):
        head.to_cache(model)
    with pytest.raises(KVStateError):
        generate(model, tok, QUESTION, max_new_tokens=2, state=head)
    # a tail slice keeps what the sliding layers need and imports fine
    tail = state[ids.shape[1] - window :]
    tail.check_complete()


# ----------------------------------------------------------------------------- facts
def test_nbytes_is_the_sum_of_tensor_bytes(ctx):
    model, _, ids, state = ctx
    total = sum(t.numel() * t.element_size() for layer in state.layers for t in layer.tensors.values())
    assert state.nbytes == total > 0
    cfg = text_config(model)
    per_token = 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # keys + values, float32
    assert total == sum(layer.length for layer in state.layers) * per_token
    assert state.select_layers([0]).nbytes == state.layers[0].nbytes


def test_describe(ctx):
    model, _, ids, state = ctx
    desc = state.describe()
    assert len(desc.rows) == len(state)
    for row, layer in zip(desc.rows, state.layers):
        assert len(row["key_norm"]) == len(row["value_norm"]) == _kv_heads(model)
        assert row["tokens"] == layer.length and row["bytes"] == layer.nbytes
        assert all(x > 0 for x in row["key_norm"] + row["value_norm"])
    # the norms are what they say: mean L2 norm per head over tokens
    k = state.layers[0].keys
    assert desc.rows[0]["key_norm"] == pytest.approx(k.norm(dim=-1).mean(dim=(0, 2)).tolist(), rel=1e-5)

    text = str(desc)
    lines = text.splitlines()
    assert state.fingerprint in lines[0] and f"tokens={ids.shape[1]}" in lines[0]
    rows = lines[2:]
    assert [int(line.split()[0]) for line in rows] == list(range(len(state)))
    for line, kind in zip(rows, state.layer_types):
        assert ("sliding" if kind == "sliding_attention" else "full") in line

    d = desc.to_dict()
    assert d["tokens"] == ids.shape[1] and d["nbytes"] == state.nbytes
    json.dumps(d)  # JSON-able


# ----------------------------------------------------------------------------- batches
def test_batch_of_two_exported_and_imported_continues_identically(tiny, tmp_path):
    model, tok = tiny
    texts = [CONTEXT, CONTEXT.upper()]
    ids = torch.cat([ids_of(tok, t) for t in texts], dim=0)  # equal lengths, different tokens
    q = torch.cat([ids_of(tok, QUESTION, special=False)] * 2, dim=0)
    cache = prefilled_cache(model, ids)
    state = KVState.from_cache(cache, model, ids)
    assert state.batch_size == 2 and state.layers[0].keys.shape[0] == 2

    loaded = KVState.load(state.save(tmp_path / "batch.kv"), model=model)
    _assert_states_equal(state, loaded)

    ref = greedy_continue(model, cache, ids.shape[1], q, N_NEW)
    imported = greedy_continue(model, loaded.to_cache(model), ids.shape[1], q, N_NEW)
    assert torch.equal(imported, ref)
    hf = hf_greedy(model, torch.cat([ids, q], 1), N_NEW, cache=loaded.to_cache(model))
    assert torch.equal(hf, ref)

    # rows were not mixed up: each row continues like its prompt alone
    for row, text in enumerate(texts):
        single = prefill(model, tok, ids_of(tok, text))
        alone = generate(model, tok, QUESTION, max_new_tokens=N_NEW, state=single, stop_at_eos=False)
        assert ref[row].tolist() == alone.token_ids


def _assert_same_continuation(model, tok, a, b):
    """Greedy continuations of QUESTION from two states are identical."""
    ra = generate(model, tok, QUESTION, max_new_tokens=N_NEW, state=a, stop_at_eos=False)
    rb = generate(model, tok, QUESTION, max_new_tokens=N_NEW, state=b, stop_at_eos=False)
    assert ra.token_ids == rb.token_ids
