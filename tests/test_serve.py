"""kvforge.serve on the tiny models: batching equals one-at-a-time greedy decoding, the prefix store
(budget, LRU, backends, mismatches), admission control, the HTTP API's answers and errors."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from kvhelpers import ids_of, one_thread
from serve_helpers import redis_server, wait_until

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from kvforge import KVState, build_cache, generate, prefill  # noqa: E402
from kvforge.serve import Engine, Overloaded, PrefixStore, Request, RequestTooLarge, SamplingParams  # noqa: E402
from kvforge.serve.api import ServerInfo, create_app  # noqa: E402
from kvforge.serve.store import block_hashes  # noqa: E402
from kvforge.serve.text import TextStream  # noqa: E402
from kvforge.state import KVFileError  # noqa: E402

QUANT = "kvforge-quant:key_bits=4,value_bits=4,key_group=16,value_group=16,residual=16"
PROMPTS = [
    "Hello there, how are",
    "The quick brown fox jumps over the lazy dog and then some more words to make it long",
    "ab",
    "Once upon a time in a land far away there lived",
    "x" * 40,
]
GREEDY = dict(temperature=0.0)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def reference(model, tok, prompt: str, n: int, spec: str = "dynamic") -> list[int]:
    """Greedy tokens of the reference loop (one request, its own cache, one prefill pass)."""
    return generate(model, tok, ids_of(tok, prompt), max_new_tokens=n, cache=build_cache(spec, model)).token_ids


class Collector:
    """Records a request's events; ``done`` is set at its end."""

    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, e):
        self.events.append(e)
        if e.finish_reason or e.error:
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)


def submit(engine, tok, prompt: str, **params) -> tuple[Request, Collector]:
    c = Collector()
    req = Request(list(ids_of(tok, prompt)[0].tolist()), SamplingParams(**{**GREEDY, **params}), c)
    engine.submit(req)
    return req, c


# ------------------------------------------------------------------------------------------ batching
@pytest.mark.parametrize("spec,chunk", [("dynamic", 16), (QUANT, 512)], ids=["dynamic-chunked", "kvforge-quant"])
def test_batched_greedy_equals_unbatched(tiny, spec, chunk):
    """Five prompts of different lengths decoded together give each prompt's one-at-a-time greedy tokens."""
    model, tok = tiny
    n = 24
    refs = [reference(model, tok, p, n, spec) for p in PROMPTS]
    engine = Engine(model, tok, spec, prefill_chunk=chunk, idle_chunk=chunk)
    got = [submit(engine, tok, p, max_tokens=n) for p in PROMPTS]  # all queued before the engine runs
    engine.start()
    try:
        for _, c in got:
            assert c.done.wait(60), "request did not finish"
    finally:
        engine.stop()
    assert [req.generated for req, _ in got] == refs
    steps, rows = engine.metrics.get("decode_steps_total"), engine.metrics.get("decode_rows_total")
    assert rows / steps > 3, f"decode steps served {rows / steps:.1f} requests on average: not batched"
    assert engine.kv_bytes_held == 0 and all(req.cache is None for req, _ in got)


def test_batched_prefill_equals_one_at_a_time(tiny):
    """Prompt chunks of several requests read in one padded pass, one of them continuing a stored prefix,
    give each request its one-at-a-time greedy tokens. (``dynamic`` only: a quantized cache quantizes a
    prompt read in two chunks at other points than one read whole, batched or not.)"""
    model, tok = tiny
    spec = "dynamic"
    doc = "Some shared words, then "
    prompts = [doc + "a question?", "Short prompt one", "Another prompt!", "The third prompt"]
    refs = [reference(model, tok, p, 10, spec) for p in prompts]
    store = PrefixStore(model, spec, block=8, min_tokens=8)
    engine = Engine(model, tok, spec, store=store)
    _, first = submit(engine, tok, doc + "something else", max_tokens=2)
    engine.start()
    assert first.done.wait(30)
    engine.stop()  # queue the rest before the engine runs again, so they are read together
    got = [submit(engine, tok, p, max_tokens=10) for p in prompts]
    passes, rows = engine.metrics.get("prefill_passes_total"), engine.metrics.get("prefill_rows_total")
    engine.start()
    try:
        for _, c in got:
            assert c.done.wait(30)
    finally:
        engine.stop()
    if not any(t == "sliding_attention" for t in getattr(model.config, "layer_types", None) or []):
        assert got[0][0].prefix_tokens == 24  # one row continued a stored prefix (not cut: sliding layers)
    passes = engine.metrics.get("prefill_passes_total") - passes
    rows = engine.metrics.get("prefill_rows_total") - rows
    assert rows >= passes + 3  # the four first chunks were read in one pass
    assert [req.generated for req, _ in got] == refs


def test_requests_join_and_leave_between_decode_steps(tiny_llama):
    """A long request is generating; two more arrive, join its decode batch, finish and leave before it ends."""
    model, tok = tiny_llama
    long_prompt, n_long = "Once upon a time", 300
    ref_long = reference(model, tok, long_prompt, n_long)
    assert len(ref_long) == n_long  # no EOS: it keeps generating while the others come and go
    engine = Engine(model, tok, "dynamic", prefill_chunk=8).start()
    # slow each forward pass a little so the long request is surely still running when the others finish
    hook = model.register_forward_pre_hook(lambda *a: time.sleep(0.002))
    try:
        a, ca = submit(engine, tok, long_prompt, max_tokens=n_long)
        wait_until(lambda: len(a.generated) >= 5, what="the first request to start generating")
        b, cb = submit(engine, tok, PROMPTS[0], max_tokens=6)
        c, cc = submit(engine, tok, PROMPTS[1], max_tokens=6)
        assert cb.done.wait(30) and cc.done.wait(30)
        assert not a.done, "the late requests waited for the first one to finish"
        assert ca.done.wait(60)
    finally:
        hook.remove()
        engine.stop()
    assert a.generated == ref_long
    assert b.generated == reference(model, tok, PROMPTS[0], 6)
    assert c.generated == reference(model, tok, PROMPTS[1], 6)


def test_sampling_seed_and_stop(tiny_llama):
    model, tok = tiny_llama
    engine = Engine(model, tok, "dynamic").start()
    try:
        texts = [engine.generate(ids_of(tok, PROMPTS[3])[0].tolist(), SamplingParams(max_tokens=12, temperature=1.0,
                                 top_p=0.9, seed=7))[1] for _ in range(2)]
        assert texts[0] == texts[1]  # the same seed, the same tokens
        full, _, end = engine.generate(ids_of(tok, PROMPTS[1])[0].tolist(), SamplingParams(max_tokens=20, **GREEDY))
        assert end.finish_reason == "length" and end.usage["completion_tokens"] == 20
        stop = full[5:8]
        cut, _, end = engine.generate(ids_of(tok, PROMPTS[1])[0].tolist(),
                                      SamplingParams(max_tokens=20, stop=[stop], **GREEDY))
        assert end.finish_reason == "stop" and cut == full[: full.index(stop)]
    finally:
        engine.stop()


def test_text_stream_holds_back_possible_stop_strings(tiny_llama):
    _, tok = tiny_llama
    s = TextStream(tok, stop=["STOP"])
    out = [s.add(i) for i in tok("ab STand ST", add_special_tokens=False).input_ids]
    assert "".join(out) == "ab STand " and s.flush() == "ST"  # "ST" was held until it could not be a stop
    s = TextStream(tok, stop=["STOP"])
    out = [s.add(i) for i in tok("hello STOP world", add_special_tokens=False).input_ids]
    assert "".join(out) == "hello " and s.stopped


# ------------------------------------------------------------------------------------------ prefix store
def _state(model, tok, text: str, tokens: int, spec: str = "dynamic") -> KVState:
    ids = ids_of(tok, text)[:, :tokens]
    assert ids.shape[1] == tokens
    return prefill(model, tok, ids, cache=build_cache(spec, model))


def test_kvstate_bytes_round_trip_and_integrity(tiny_llama):
    model, tok = tiny_llama
    for spec in ("dynamic", QUANT):
        state = _state(model, tok, PROMPTS[1], 64, spec)
        back = KVState.from_bytes(state.to_bytes(), model=model)
        assert back.fingerprint == state.fingerprint and torch.equal(back.token_ids, state.token_ids)
        for a, b in zip(state.layers, back.layers):
            assert a.kind == b.kind and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    data = bytearray(state.to_bytes())
    data[-3] ^= 0xFF
    with pytest.raises(KVFileError, match="integrity"):
        KVState.from_bytes(bytes(data))


def test_store_lru_eviction_within_budget(tiny_llama):
    model, tok = tiny_llama
    states = [_state(model, tok, c * 80, 64) for c in "abc"]
    size = states[0].nbytes + 64 * 8
    store = PrefixStore(model, "dynamic", max_bytes=2 * size + 10, block=16, min_tokens=16)
    store.put(states[0])
    store.put(states[1])
    assert store.lookup(states[0].token_ids[0].tolist() + [5]) is not None  # touch a: b is now the oldest
    store.put(states[2])
    assert len(store) == 2 and store.nbytes() <= store.max_bytes and store.stats.evictions == 1
    assert store.lookup(states[1].token_ids[0].tolist() + [5]) is None
    for s in (states[0], states[2]):
        hit = store.lookup(s.token_ids[0].tolist() + [5, 6])
        assert hit is not None and hit.tokens == 64


@pytest.mark.parametrize("backend", ["memory", "directory", "redis"])
def test_store_backends_share_and_keep_prefixes(tiny_llama, tmp_path, backend):
    """The longest stored block-aligned prefix is found, exactly; a directory store survives a restart and a
    Redis store is seen by a second store object (as a second server process would)."""
    model, tok = tiny_llama

    def run(location):
        state = _state(model, tok, PROMPTS[1], 64, QUANT)
        store = PrefixStore(model, QUANT, location, block=16, min_tokens=16)
        store.put(state)
        prompt = state.token_ids[0].tolist()[:40] + [9, 9, 9]  # shares 40 tokens: 32 in whole blocks
        hit = store.lookup(prompt)
        assert hit is not None and hit.tokens == 32
        assert torch.equal(hit.state.token_ids[0], state.token_ids[0, :32])
        full = store.lookup(state.token_ids[0].tolist() + [1, 2])
        assert full.tokens == 64 and full.state.layers[0].kind == "kvforge-quant"  # kept in the cache's encoding
        assert store.nbytes() < _state(model, tok, PROMPTS[1], 64).nbytes  # quantized bytes, not dense ones
        if location is not None:  # a fresh store (restart, or another process) sees the entry
            again = PrefixStore(model, QUANT, location, block=16, min_tokens=16)
            hit = again.lookup(state.token_ids[0].tolist() + [1])
            assert hit is not None and hit.tokens == 64
            for a, b in zip(state.layers, hit.state.layers):
                assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)

    if backend == "redis":
        with redis_server() as url:
            run(url)
    else:
        run(None if backend == "memory" else str(tmp_path / "store"))


def test_store_never_uses_another_models_or_specs_state(tiny_llama, tiny_gemma):
    model, tok = tiny_llama
    gemma, _ = tiny_gemma
    store = PrefixStore(model, "dynamic", block=16, min_tokens=16)
    with pytest.raises(Exception, match="model"):
        store.put(_state(gemma, tok, PROMPTS[1], 32))
    ids = ids_of(tok, PROMPTS[1])[0, :32].tolist()
    # planted straight into the backend, under the key this prompt's blocks lead to
    foreign = _state(gemma, tok, PROMPTS[1], 32)
    store.backend.put("planted", foreign, foreign.nbytes, block_hashes(ids, 16))
    assert store.lookup(ids + [4]) is None and store.stats.rejected == 1
    other_spec = _state(model, tok, PROMPTS[1], 32)
    other_spec.meta = {"cache_spec": QUANT}
    store.backend.put("planted2", other_spec, other_spec.nbytes, block_hashes(ids, 16))
    assert store.lookup(ids + [4]) is None and store.stats.rejected == 2
    assert len(store) == 0  # rejected entries are dropped


def test_engine_reuses_stored_prefix_and_prefills_only_the_suffix(tiny_llama):
    model, tok = tiny_llama
    doc = "A shared document that many requests start with. " * 3
    store = PrefixStore(model, "dynamic", block=16, min_tokens=16)
    engine = Engine(model, tok, "dynamic", store=store).start()
    try:
        _, first, end1 = engine.generate(ids_of(tok, doc + "First?")[0].tolist(), SamplingParams(max_tokens=8, **GREEDY))
        assert end1.usage["prompt_tokens_details"]["cached_tokens"] == 0
        before = engine.metrics.get("prefill_tokens_total")
        prompt2 = ids_of(tok, doc + "Second one?")[0].tolist()
        _, second, end2 = engine.generate(prompt2, SamplingParams(max_tokens=8, **GREEDY))
    finally:
        engine.stop()
    cached = end2.usage["prompt_tokens_details"]["cached_tokens"]
    assert cached >= len(ids_of(tok, doc)[0]) - 16 and cached % 16 == 0
    assert engine.metrics.get("prefill_tokens_total") - before == len(prompt2) - cached
    assert engine.metrics.get("prefix_hits_total") == 1 and engine.metrics.get("prefix_misses_total") == 1
    assert second == reference(model, tok, doc + "Second one?", 8)
    assert first == reference(model, tok, doc + "First?", 8)


def test_sliding_window_model_reuses_exact_prefixes_only(tiny_gemma):
    """A sliding layer keeps only its window, so a stored Gemma prefix can be continued from its end but not
    cut shorter: a partly shared prompt is a miss (and still right), the same prompt again a hit."""
    model, tok = tiny_gemma
    doc = "shared document text " * 4
    store = PrefixStore(model, QUANT, block=8, min_tokens=8)
    engine = Engine(model, tok, QUANT, store=store).start()
    try:
        for question, cached in (("first question here", 0), ("second one", 0), ("first question here", 96)):
            ids = ids_of(tok, doc + question)[0].tolist()
            _, tokens, end = engine.generate(ids, SamplingParams(max_tokens=8, **GREEDY))
            assert end.usage["prompt_tokens_details"]["cached_tokens"] == cached
            assert tokens == reference(model, tok, doc + question, 8, QUANT)
    finally:
        engine.stop()
    assert engine.metrics.get("prefix_store_errors_total") == 0


# ------------------------------------------------------------------------------------------ admission
def test_admission_waits_then_rejects(tiny_llama):
    model, tok = tiny_llama
    probe = Engine(model, tok, "dynamic")
    one = probe.kv_bytes_for(len(ids_of(tok, PROMPTS[1])[0]) + 20)
    engine = Engine(model, tok, "dynamic", max_kv_bytes=int(one * 1.5), max_queue=1)  # room for one request
    a, ca = submit(engine, tok, PROMPTS[1], max_tokens=20)
    b, cb = submit(engine, tok, PROMPTS[1], max_tokens=20)
    assert list(engine.waiting) == [b] and list(engine.prefilling) == [a]
    with pytest.raises(Overloaded):
        submit(engine, tok, PROMPTS[1], max_tokens=20)
    with pytest.raises(RequestTooLarge, match="max-kv-bytes"):
        submit(engine, tok, PROMPTS[1], max_tokens=400)
    engine.start()
    try:
        assert ca.done.wait(30) and cb.done.wait(30)
    finally:
        engine.stop()
    assert a.generated == b.generated == reference(model, tok, PROMPTS[1], 20)
    assert engine.peak_kv_bytes <= engine.max_kv_bytes


# ------------------------------------------------------------------------------------------ HTTP
@pytest.fixture
def client(tiny_llama):
    model, tok = tiny_llama
    engine = Engine(model, tok, "dynamic", store=PrefixStore(model, "dynamic", block=16, min_tokens=16))
    app = create_app(engine.start(), ServerInfo("tiny-llama", "dynamic", default_max_tokens=16))
    with TestClient(app) as c:
        c.engine = engine
        yield c


def _error(r, status: int, words: str, param: str | None = None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words.lower() in err["message"].lower(), err
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param


def test_http_bad_input_gets_openai_errors_and_server_keeps_serving(client):
    url = "/v1/completions"
    ok = {"model": "tiny-llama", "prompt": "Hello", "max_tokens": 3}
    _error(client.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400, "not valid JSON")
    _error(client.post(url, json=[1, 2]), 400, "must be a JSON object")
    _error(client.post(url, json={"prompt": "x"}), 400, "'model'", "model")
    _error(client.post(url, json={**ok, "model": "gpt-9"}), 404, "gpt-9", "model")
    _error(client.post(url, json={**ok, "max_tokens": "10"}), 400, "must be integer", "max_tokens")
    _error(client.post(url, json={**ok, "max_tokens": -1}), 400, "at least 1", "max_tokens")
    _error(client.post(url, json={**ok, "max_tokens": 10**9}), 400, "maximum context length", "max_tokens")
    _error(client.post(url, json={**ok, "prompt": "y" * 600}), 400, "maximum context length", "prompt")
    _error(client.post(url, json={**ok, "prompt": 5}), 400, "'prompt' must be", "prompt")
    _error(client.post(url, json={**ok, "prompt": [[1, 2], [3]]}), 400, "one prompt per request", "prompt")
    _error(client.post(url, json={**ok, "temperature": 7}), 400, "temperature", "temperature")
    _error(client.post(url, json={**ok, "stream": "yes"}), 400, "'stream' must be boolean", "stream")
    _error(client.post(url, json={**ok, "n": 2}), 400, "'n' must be 1", "n")
    _error(client.post(url, json={**ok, "stop": [1]}), 400, "'stop'", "stop")
    _error(client.post(url, json={**ok, "logprobs": 2}), 400, "'logprobs' is not supported", "logprobs")
    chat = "/v1/chat/completions"
    _error(client.post(chat, json={"model": "tiny-llama", "messages": "hi"}), 400, "'messages' must be array")
    _error(client.post(chat, json={"model": "tiny-llama", "messages": [{"content": "hi"}]}), 400, "role")
    _error(client.post(chat, json={"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}],
                                   "tools": [{"type": "function"}]}), 400, "'tools' is not supported", "tools")
    _error(client.get("/v1/nothing"), 404, "not found")
    r = client.post(url, json=ok)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
    assert client.engine.metrics.get("requests_total", status="invalid") == 18


def test_http_completions_chat_models_health_metrics(client):
    body = {"model": "tiny-llama", "prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0}
    r = client.post("/v1/completions", json=body).json()
    assert r["object"] == "text_completion" and r["choices"][0]["finish_reason"] in ("length", "stop")
    assert r["usage"]["prompt_tokens"] == len(ids_of(client.engine.tokenizer, PROMPTS[1])[0])
    chat = client.post("/v1/chat/completions", json={"model": "tiny-llama", "temperature": 0, "max_tokens": 5,
                       "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}).json()
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["usage"]["completion_tokens"] <= 5
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny-llama"
    assert client.get("/health").json()["status"] == "ok"
    text = client.get("/metrics").text
    for name in ("kvforge_requests_total{status=\"ok\"} 2", "kvforge_generated_tokens_total",
                 "kvforge_time_to_first_token_seconds_count 2", "kvforge_kv_bytes_held", "kvforge_prefix_hits_total",
                 "kvforge_prefix_misses_total 2"):
        assert name in text, name


def _sse(client, path: str, body: dict) -> list:
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def test_http_streaming_matches_non_streaming(client):
    body = {"model": "tiny-llama", "prompt": PROMPTS[1], "max_tokens": 10, "temperature": 0}
    plain = client.post("/v1/completions", json=body).json()
    chunks = _sse(client, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == plain["choices"][0]["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["total_tokens"] == plain["usage"]["total_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0  # the same prompt again: its prefix was stored
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    chat = {"model": "tiny-llama", "messages": msgs, "max_tokens": 8, "temperature": 0}
    plain = client.post("/v1/chat/completions", json=chat).json()
    chunks = _sse(client, "/v1/chat/completions", {**chat, "stream": True})
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == plain["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]


def test_http_503_with_retry_after_when_queue_is_full(tiny_llama):
    model, tok = tiny_llama
    engine = Engine(model, tok, "dynamic", max_kv_bytes=Engine(model, tok).kv_bytes_for(200), max_queue=0)
    app = create_app(engine, ServerInfo("tiny-llama", "dynamic"))  # engine not started: what is admitted stays
    submit(engine, tok, PROMPTS[1], max_tokens=100)
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"model": "tiny-llama", "prompt": PROMPTS[1], "max_tokens": 50})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "server_overloaded"
        r = c.post("/v1/completions", json={"model": "tiny-llama", "prompt": "a", "max_tokens": 400})
        _error(r, 400, "max-kv-bytes", "max_tokens")


def test_client_disconnect_mid_stream_frees_slot_and_cache(tiny_llama):
    import httpx

    from kvforge.serve.server import BackgroundServer

    model, tok = tiny_llama
    engine = Engine(model, tok, "dynamic").start()
    hook = model.register_forward_pre_hook(lambda *a: time.sleep(0.005))  # ~2.5 s for the whole request
    try:
        with BackgroundServer(create_app(engine, ServerInfo("tiny-llama", "dynamic"))) as srv:
            body = {"model": "tiny-llama", "prompt": "Once upon a time", "max_tokens": 480, "temperature": 0,
                    "stream": True}
            with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=30) as r:
                lines = r.iter_lines()
                assert next(line for line in lines if line).startswith("data: {")
                assert len(engine.running) == 1 and engine.kv_bytes_held > 0
            t0 = time.time()
            wait_until(lambda: not engine.running and not engine.prefilling, timeout=5, what="the slot to be freed")
            assert time.time() - t0 < 1.0
            assert engine.kv_bytes_held == 0
            assert engine.metrics.get("requests_total", status="cancelled") == 1
            assert engine.metrics.get("generated_tokens_total") < 400
            # a non-streaming client that gives up is noticed within the server's 0.5 s poll
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(srv.url + "/v1/completions", json={**body, "stream": False}, timeout=0.3)
            wait_until(lambda: not engine.running and not engine.prefilling, timeout=3, what="the slot to be freed")
            assert engine.metrics.get("requests_total", status="cancelled") == 2
            r = httpx.post(srv.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 3}, timeout=30)
            assert r.status_code == 200  # and it keeps serving
    finally:
        hook.remove()
        engine.stop()


def test_cli_serve_arguments():
    from kvforge.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", "smollm2-135m", "--cache", "kvforge-quant:preset=safe",
                                      "--max-kv-bytes", "512M", "--kv-store", "redis://127.0.0.1:6379", "--port", "9"])
    assert args.max_kv_bytes == 512 << 20 and args.kv_store.startswith("redis://") and args.func.__name__ == "cmd_serve"
