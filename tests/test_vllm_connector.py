"""kvforge's connector inside vLLM (the CPU build), two processes sharing prefixes through Redis.

Runs where ``make vllm-env`` made ``.venv-vllm`` (or ``KVFORGE_VLLM_PYTHON`` names an interpreter with vLLM and
kvforge); skipped with a message elsewhere. Each vLLM instance is its own process
(:func:`kvforge.integrations.vllm.offline.launch`, about 20 s to start here); a throwaway redis-server
on 127.0.0.1 is the store. About 2 minutes in all.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import real_model
from serve_helpers import redis_server

from kvforge.integrations.vllm.offline import launch
from kvforge.models import resolve
from kvforge.run import decode, new_cache, prefill
from kvforge.serve import PrefixStore
from kvforge.serve.backends import salt_seed
from kvforge.state import KVState
from kvforge.texts import load_text

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
QUANT = "kvforge-quant:preset=safe"
NEW = 16  # greedy tokens per request


def _vllm_python() -> str:
    python = os.environ.get("KVFORGE_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
    if not Path(python).exists():
        pytest.skip(f"no vLLM environment ({python} is missing): run `make vllm-env` to test the vLLM connector")
    probe = subprocess.run([python, "-c", "import vllm, kvforge.integrations.vllm"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"{python} cannot import vllm and kvforge: {probe.stderr.strip()[-300:]}")
    return python


@pytest.fixture(scope="module")
def setup():
    python = _vllm_python()
    model, tok = real_model(MODEL)
    ids = tok(load_text("kjv"), return_tensors=None)["input_ids"]
    docs = [ids[i * 1200: i * 1200 + 1000] for i in range(4)]  # four 1,000-token prefixes
    q1, q2 = (tok(q)["input_ids"] for q in ("\n\nQuestion: who speaks here?\nAnswer:",
                                              "\n\nQuestion: which places appear?\nAnswer:"))
    with redis_server() as url:
        yield {"python": python, "model": model, "dir": resolve(MODEL), "docs": docs, "q1": q1, "q2": q2,
               "redis": url}


def _job(s, cache: str, prompts: list[list[int]]) -> dict:
    return {"model": s["dir"], "extra": {"store": s["redis"], "cache": cache}, "prompts": prompts,
            "max_tokens": NEW, "max_model_len": 2048, "kv_space_gib": 1}


def _reference(model, state: KVState, prompt: list[int]) -> list[int]:
    """kvforge's own continuation of ``prompt`` from ``state`` (its first tokens, dequantized), greedy."""
    with torch.inference_mode():
        cache = state.to_cache(model)
        logits = prefill(model, torch.tensor([prompt[state.num_tokens:]]), cache)
        return decode(model, cache, logits, NEW, log_probs=False)[0][0].tolist()


def test_dynamic_prefix_is_shared_and_bad_entries_are_misses(setup):
    s = setup
    p1, bad1, bad2 = (s["docs"][0] + s["q1"], s["docs"][1] + s["q1"], s["docs"][2] + s["q1"])
    first = launch(s["python"], _job(s, "dynamic", [p1, bad1, bad2]))
    assert first["connector"]["stored_prefixes"] == 3 and first["connector"]["loaded_tokens"] == 0

    # one entry corrupted in place, one replaced by another model's state (valid bytes, foreign fingerprint)
    store = PrefixStore(s["model"], "dynamic", s["redis"])
    client, key = store.backend.client, store.backend._k
    n = len(bad1) // 32 * 32
    e1 = key("e:" + store._key(bad1[:n], salt_seed(None)))
    data = bytearray(client.get(e1))
    data[len(data) // 2] ^= 0xFF
    client.set(e1, bytes(data))
    e2 = key("e:" + store._key(bad2[:n], salt_seed(None)))
    foreign = KVState.from_bytes(client.get(e2))
    foreign.fingerprint = "0123456789abcdef"
    client.set(e2, foreign.to_bytes())

    second = launch(s["python"], _job(s, "dynamic", [p1, bad1, bad2]))
    hit, miss1, miss2 = second["results"]
    assert hit["cached_tokens"] == len(p1) // 32 * 32, "the second instance loaded the prefix from Redis"
    assert "kvforge connector: loaded" in second["log"]
    assert hit["tokens"] == first["results"][0]["tokens"], "a dynamic entry continues exactly"
    assert miss1["cached_tokens"] == 0 and miss2["cached_tokens"] == 0, "bad entries are never loaded"
    assert miss1["tokens"] == first["results"][1]["tokens"] and miss2["tokens"] == first["results"][2]["tokens"]
    assert second["connector"]["rejected"] == 2 and second["connector"]["load_failures"] == 0


def test_quantized_prefix_matches_kvforge_and_interoperates_with_kvforge_serve(setup):
    s = setup
    model, (d0, d3) = s["model"], (s["docs"][0], s["docs"][3])
    p1 = d0 + s["q2"]
    first = launch(s["python"], _job(s, QUANT, [p1]))
    assert first["connector"]["stored_prefixes"] == 1

    # vLLM -> kvforge: the entry vLLM stored is a hit for kvforge's own store (what `kvforge serve` uses)
    store = PrefixStore(model, QUANT, s["redis"])
    hit = store.lookup(p1, limit=len(p1) - 1)
    assert hit is not None and hit.tokens == len(p1) // 32 * 32 and hit.state.layers[0].kind == "kvforge-quant"
    # kvforge -> vLLM: a prefix kvforge computed and stored is a hit for vLLM
    mine = torch.tensor([d3[:960]])
    cache = new_cache(model, QUANT)
    with torch.inference_mode():
        prefill(model, mine, cache)
    store.put(KVState.from_cache(cache, model, mine))

    second = launch(s["python"], _job(s, QUANT, [p1, d3 + s["q2"]]))
    got, theirs = second["results"]
    assert got["cached_tokens"] == hit.tokens and theirs["cached_tokens"] == 960
    assert second["connector"]["stored_prefixes"] == 1  # d3's whole prompt, longer than kvforge's entry
    # the same stored codes, continued by kvforge (dequantized, full precision after): the same tokens
    assert got["tokens"] == _reference(model, hit.state, p1)
    assert theirs["tokens"] == _reference(model, KVState.from_cache(cache, model, mine), d3 + s["q2"])
