"""A live ``kvforge serve`` on smollm2-135m, talked to with the official ``openai`` client; two servers
(this process and a ``kvforge serve`` subprocess) sharing one Redis prefix store."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from conftest import real_model
from serve_helpers import free_port, redis_server

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m"
DOC = (
    "kvforge keeps the KV cache of a causal language model as data. A prefix store holds the keys and values "
    "of prompts that many requests share, such as a long system prompt or a document, so that a later request "
    "that starts with the same tokens only runs its own suffix through the model. The store keeps entries in "
    "the server's cache format, within a byte budget, and evicts the least recently used entry first. "
) * 3


@pytest.fixture(scope="module")
def redis_url():
    with redis_server() as url:
        yield url


@pytest.fixture(scope="module")
def server(redis_url):
    from kvforge.serve.server import BackgroundServer, ServeConfig, build

    model, tok = real_model(MODEL)
    app, engine = build(ServeConfig(model=MODEL, kv_store=redis_url), model=model, tokenizer=tok)
    with BackgroundServer(app) as srv:
        srv.engine = engine
        yield srv
    engine.stop()


def _client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_openai_client_chat_and_completions(server):
    client = _client(server.url)
    assert [m.id for m in client.models.list()] == [MODEL]
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    text = chat.choices[0].message.content
    assert "Paris" in text and chat.choices[0].finish_reason in ("stop", "length")
    assert 0 < chat.usage.completion_tokens <= 8 and chat.usage.prompt_tokens > 10
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens

    prompt = "The three primary colors are red,"
    done = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    assert done.choices[0].text and done.usage.completion_tokens <= 6
    pieces = [c.choices[0].text for c in client.completions.create(model=MODEL, prompt=prompt, max_tokens=6,
                                                                   temperature=0, stream=True)]
    assert "".join(pieces) == done.choices[0].text
    stopped = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=12, temperature=0,
                                        stop=[" 6"])
    assert " 6" not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"

    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4o", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=-3)
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens <= 2


def test_two_servers_share_a_redis_prefix_store(server, redis_url):
    """A prefix stored by this process's server is used by a second server process."""
    port = free_port()
    env = {**os.environ, "KVFORGE_QUIET": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvforge", "serve", "--model", MODEL, "--port", str(port), "--kv-store", redis_url],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        first = _client(server.url).chat.completions.create(
            model=MODEL, temperature=0, max_tokens=4,
            messages=[{"role": "system", "content": DOC}, {"role": "user", "content": "What does the store keep?"}],
        )
        assert first.usage.prompt_tokens > 200
        other = _client(f"http://127.0.0.1:{port}")
        deadline = time.time() + 120
        while True:  # wait for the second server to load its model and listen
            try:
                other.models.list()
                break
            except openai.APIConnectionError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"the second server did not start: {proc.stdout.read()}") from None
                time.sleep(0.5)
        second = other.chat.completions.create(
            model=MODEL, temperature=0, max_tokens=4,
            messages=[{"role": "system", "content": DOC}, {"role": "user", "content": "How is it bounded?"}],
        )
        cached = second.usage.prompt_tokens_details.cached_tokens
        assert cached >= 200, f"the second server reused {cached} tokens"
        import httpx

        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert "kvforge_prefix_hits_total 1" in metrics
    finally:
        proc.terminate()
        proc.wait(timeout=30)
