"""kvforge serve between users: cache_salt isolation on every backend, pinned and pre-loaded prefixes, honest
capacity limits, and the OpenAI parameter edges (top_p 0, chat without a template)."""

from __future__ import annotations

import json

import pytest
from kvhelpers import ids_of, one_thread
from serve_helpers import redis_server, wait_until

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from kvforge import KVState, build_cache, prefill  # noqa: E402, F401
from kvforge.serve import Engine, PrefixStore, SamplingParams  # noqa: E402
from kvforge.serve.api import ServerInfo, create_app  # noqa: E402
from kvforge.serve.request import Request  # noqa: E402
from kvforge.serve.server import preload  # noqa: E402

DOC = "The quick brown fox jumps over the lazy dog and then some more words to make it long. " * 3


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _state(model, tok, text: str, n: int, spec: str = "dynamic") -> KVState:
    ids = ids_of(tok, text)[:, :n]
    assert ids.shape[1] == n
    return prefill(model, tok, ids, cache=build_cache(spec, model))


def _location(backend, tmp_path, url):
    return {"memory": None, "directory": str(tmp_path / "store"), "redis": url}[backend]


@pytest.mark.parametrize("backend", ["memory", "directory", "redis"])
def test_salted_prefixes_are_never_shared_across_salts(tiny_llama, tmp_path, backend):
    """A prefix stored under salt A is found under A only: not under B, not without a salt; and the other way
    round. The directory and Redis stores keep the salt across a restart (a new store object)."""
    model, tok = tiny_llama
    state = _state(model, tok, DOC, 64)
    prompt = state.token_ids[0].tolist() + [5, 6]

    def check(location):
        store = PrefixStore(model, "dynamic", location, block=16, min_tokens=16)
        store.put(state, salt="tenant-a")
        for s in (store, PrefixStore(model, "dynamic", location, block=16, min_tokens=16) if location else store):
            assert s.lookup(prompt, salt="tenant-a").tokens == 64
            assert s.lookup(prompt, salt="tenant-b") is None
            assert s.lookup(prompt) is None
        store.put(_state(model, tok, DOC, 64))  # the same tokens without a salt: a separate entry
        assert store.lookup(prompt).tokens == 64 and store.lookup(prompt, salt="tenant-b") is None
        assert len(store) == 2

    if backend == "redis":
        with redis_server() as url:
            check(url)
    else:
        check(_location(backend, tmp_path, None))


def test_salted_entry_is_refused_even_under_a_colliding_hash(tiny_llama):
    """The salt is checked against the entry itself, not only through the hashes."""
    from kvforge.serve.store import block_hashes, salt_seed

    model, tok = tiny_llama
    store = PrefixStore(model, "dynamic", block=16, min_tokens=16)
    state = _state(model, tok, DOC, 32)
    ids = state.token_ids[0].tolist()
    key = store.put(state, salt="tenant-a")
    store.backend.put(key, store.backend.get(key), state.nbytes, block_hashes(ids, 16, seed=salt_seed("tenant-b")))
    assert store.lookup(ids + [1], salt="tenant-b") is None


def test_engine_request_with_another_salt_prefills_everything(tiny_llama):
    """Salt B's request after salt A stored the same prefix does the same prefill work as with nothing
    stored (no hit, cached_tokens 0): its time to first token cannot tell A's prompt; salt A's second
    request reuses A's prefix."""
    model, tok = tiny_llama
    engine = Engine(model, tok, "dynamic", store=PrefixStore(model, "dynamic", block=16, min_tokens=16))
    ids = ids_of(tok, DOC)[0].tolist()[:80]
    params = SamplingParams(max_tokens=2, temperature=0.0)

    def run(salt):
        before = engine.metrics.get("prefill_tokens_total")
        events = []
        engine.submit(Request(list(ids), params, events.append, cache_salt=salt))
        engine.start()
        wait_until(lambda: any(e.finish_reason or e.error for e in events), 30, "the request to finish")
        final = next(e for e in events if e.finish_reason)
        return final.usage["prompt_tokens_details"]["cached_tokens"], engine.metrics.get("prefill_tokens_total") - before

    try:
        alone = run("tenant-b")  # nothing of B's stored yet
        assert alone[0] == 0
        engine.store.backend = type(engine.store.backend)()  # forget B's own prefix: B starts cold again
        assert run("tenant-a")[0] == 0  # A stores the prefix
        assert run("tenant-a")[0] == 64  # A's second request reuses it
        other = run("tenant-b")
        assert other == alone, f"salt B after salt A: {other}, salt B alone: {alone}"
        assert run(None)[0] == 0
    finally:
        engine.stop()


def test_pinned_prefixes_survive_eviction_and_restart(tiny_llama, tmp_path):
    model, tok = tiny_llama
    states = [_state(model, tok, c * 80, 64) for c in "abc"]
    location = str(tmp_path / "store")
    store = PrefixStore(model, "dynamic", location, block=16, min_tokens=16)
    pinned = store.put(states[0], pin=True)
    budget = store.max_bytes = 5 * store.backend.info(pinned)[1] // 2  # room for two entries (file sizes)
    store.put(states[1])
    store.put(states[2])  # over budget: the oldest unpinned goes, not the pinned one
    ids = [s.token_ids[0].tolist() + [5] for s in states]
    assert store.lookup(ids[0]) is not None and store.lookup(ids[1]) is None and store.lookup(ids[2]) is not None
    listed = {e["id"]: e for e in store.entries()}
    assert listed[pinned]["pinned"] and listed[pinned]["tokens"] == 64 and listed[pinned]["hits"] == 1
    assert listed[pinned]["bytes"] > 0
    other = next(k for k in listed if k != pinned)
    assert store.set_pinned(other, True)  # two pinned entries fit the budget
    with pytest.raises(ValueError, match="budget"):
        store.put(states[1], pin=True)  # a third would not: refused, nothing evicted
    assert store.set_pinned(other, False) and len(store) == 2
    again = PrefixStore(model, "dynamic", location, max_bytes=budget, block=16, min_tokens=16)
    assert {e["id"] for e in again.entries() if e["pinned"]} == {pinned}
    assert again.set_pinned(pinned, False) and not any(e["pinned"] for e in again.entries())


def test_pins_persist_in_redis(tiny_llama):
    model, tok = tiny_llama
    with redis_server() as url:
        store = PrefixStore(model, "dynamic", url, block=16, min_tokens=16)
        key = store.put(_state(model, tok, DOC, 64), pin=True)
        again = PrefixStore(model, "dynamic", url, block=16, min_tokens=16)
        assert [e["pinned"] for e in again.entries() if e["id"] == key] == [True]


# ------------------------------------------------------------------------------------------ HTTP
def _client(model, tok, spec="dynamic", store=True, **info):
    engine = Engine(model, tok, spec, store=PrefixStore(model, spec, block=16, min_tokens=16) if store else None)
    return TestClient(create_app(engine.start(), ServerInfo("tiny", spec, default_max_tokens=16, **info))), engine


def test_http_prefix_endpoints_and_cached_tokens(tiny_llama, tmp_path):
    model, tok = tiny_llama
    client, engine = _client(model, tok)
    with client:
        text_ids = ids_of(tok, DOC)[0].tolist()[:70]
        r = client.post("/v1/kv/prefixes", json={"model": "tiny", "prompt": text_ids, "cache_salt": "t1"})
        assert r.status_code == 200, r.text
        entry = r.json()
        assert entry["tokens"] == 64 and entry["pinned"] and entry["bytes"] > 0
        body = {"model": "tiny", "prompt": text_ids + [7, 8], "max_tokens": 2, "temperature": 0}
        miss = client.post("/v1/completions", json={**body, "cache_salt": "t2"}).json()
        hit = client.post("/v1/completions", json={**body, "cache_salt": "t1"}).json()
        assert miss["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert hit["usage"]["prompt_tokens_details"]["cached_tokens"] == 64
        listed = client.get("/v1/kv/prefixes").json()["data"]
        assert [e["hits"] for e in listed if e["id"] == entry["id"]] == [1]
        assert client.delete(f"/v1/kv/prefixes/{entry['id']}").json()["pinned"] is False
        assert client.delete("/v1/kv/prefixes/nope").status_code == 404
        r = client.post("/v1/kv/prefixes", json={"model": "tiny", "prompt": text_ids[:10]})
        assert r.status_code == 400 and "at least" in r.json()["error"]["message"]
        # --preload: JSON lines, text or ids, salted or not; a bad line is named
        f = tmp_path / "pre.jsonl"
        f.write_text(json.dumps({"prompt": DOC}) + "\n" + json.dumps({"prompt": text_ids, "cache_salt": "t3"}) + "\n")
        loaded = preload(engine, str(f))
        assert len(loaded) == 2 and all(e["pinned"] for e in loaded)
        f.write_text("{}\n")
        with pytest.raises(ValueError, match="pre.jsonl:1"):
            preload(engine, str(f))


def test_http_require_cache_salt(tiny_llama):
    model, tok = tiny_llama
    client, _ = _client(model, tok, require_cache_salt=True)
    with client:
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 2}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt"
        assert client.post("/v1/completions", json={**body, "cache_salt": ""}).status_code == 400
        assert client.post("/v1/completions", json={**body, "cache_salt": "x"}).status_code == 200


def test_http_capacity_of_a_fixed_size_cache_is_advertised_and_enforced_up_front(tiny_llama):
    """preallocated:max_seq_len=256 holds 256 tokens (the tiny model's context is 512): /v1/models says so,
    and 240 prompt tokens + 50 is refused with a 400 before any token is generated, streaming or not (never
    a 500, never a broken stream). The issue's input, scaled to the tiny model."""
    model, tok = tiny_llama
    spec = "preallocated:max_seq_len=256"
    client, engine = _client(model, tok, spec, store=False)
    with client:
        assert client.get("/v1/models").json()["data"][0]["context_length"] == 256 == engine.capacity
        body = {"model": "tiny", "prompt": [5] * 240, "max_tokens": 50}
        for stream in (False, True):
            r = client.post("/v1/completions", json={**body, "stream": stream})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["code"] == "context_length_exceeded" and "256" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={**body, "max_tokens": 16})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_http_top_p_zero_is_greedy_and_chat_needs_a_template(tiny_llama):
    model, tok = tiny_llama
    client, _ = _client(model, tok)
    with client:
        body = {"model": "tiny", "prompt": "Hello there", "max_tokens": 4}
        greedy = client.post("/v1/completions", json={**body, "temperature": 0}).json()["choices"][0]["text"]
        r = client.post("/v1/completions", json={**body, "temperature": 0, "top_p": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy
        r = client.post("/v1/completions", json={**body, "temperature": 1.0, "top_p": 0, "seed": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy  # top_p 0: the top token only
        template = tok.chat_template
        try:
            tok.chat_template = None
            r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 400 and r.json()["error"]["code"] == "chat_template_missing"
            tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
            r = client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2,
                                                          "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200, r.text
        finally:
            tok.chat_template = template


def test_a_batched_pass_leaves_no_reference_cycle(tiny_llama):
    """A batched pass's cache view and the request caches it touched are freed as soon as they are let go,
    without Python's cyclic collector: a cycle per pass kept finished requests' caches alive until the
    collector ran, and a server's resident memory grew with every request served."""
    import gc
    import weakref

    from kvforge import run
    from kvforge.serve.batch import BatchedCache

    model, tok = tiny_llama
    caches, seen = [], []
    for n in (20, 35):
        cache = build_cache("dynamic", model)
        run.prefill(model, ids_of(tok, DOC)[:, :n], cache)
        caches.append(cache)
        seen.append(n)
    gc.collect()
    gc.disable()
    try:
        view = BatchedCache(model, caches, seen)
        out = model(input_ids=ids_of(tok, "ab")[:, :1].repeat(2, 1), **run.cache_kw(view), use_cache=True,
                    position_ids=run.row_positions(seen, [1, 1]), attention_mask=view.attention_mask(out_dtype := next(
                        model.parameters()).dtype), logits_to_keep=1)
        refs = [weakref.ref(view), *(weakref.ref(c) for c in caches)]
        assert out.logits.dtype == out_dtype
        del view, out, caches, cache
        assert [r() is None for r in refs] == [True] * len(refs)
    finally:
        gc.enable()
