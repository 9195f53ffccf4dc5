"""The main job on the bundled real models: prefill, save, load (in another process), continue.

These run on one torch thread, in the test process and in the CLI subprocesses alike: the same
arithmetic everywhere, and no second OpenMP thread stalling on a core another process is using.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from kvhelpers import greedy_continue, ids_of, one_thread, prefilled_cache

from kvforge import BUNDLED, KVState, ModelNotFoundError, generate, load_model, prefill
from kvforge.models import layer_types, text_config
from kvforge.texts import load_text

N_NEW = 12
QUESTION = "\n\nQuestion: what does the passage above describe?\nAnswer:"
CONTEXT_CHARS = 2600  # ~625 tokens for both models: more than gemma3's sliding window of 512


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def passage() -> str:
    return load_text("pydoc", "eval")[:CONTEXT_CHARS]


def kvforge(*args, timeout=300, env=None):
    full_env = {**os.environ, "KVFORGE_QUIET": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "kvforge", *map(str, args)], capture_output=True, text=True, timeout=timeout,
        env=full_env,
    )


# ----------------------------------------------------------------------------- one process
@pytest.mark.integration
def test_save_load_continue_equals_uninterrupted_run(bundled, tmp_path):
    model, tok = bundled
    ids = tok(passage(), return_tensors="pt").input_ids
    n = ids.shape[1]
    window = getattr(text_config(model), "sliding_window", None)
    sliding = [i for i, t in enumerate(layer_types(model)) if t == "sliding_attention"]
    if sliding:
        assert n > window  # the sliding layers really dropped tokens

    cache = prefilled_cache(model, ids)
    state = KVState.from_cache(cache, model, ids)
    for i, layer in enumerate(state.layers):
        assert layer.length == (window - 1 if i in sliding else n)

    path = state.save(tmp_path / "ctx.kv")
    loaded = KVState.load(path, model=model)
    for a, b in zip(state.layers, loaded.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)

    res = generate(model, tok, QUESTION, max_new_tokens=N_NEW, state=loaded, stop_at_eos=False)
    # uninterrupted: the cache the context went into continues, never exported
    q = ids_of(tok, QUESTION, special=False)
    ref = greedy_continue(model, cache, n, q, N_NEW)[0].tolist()
    assert res.token_ids == ref
    assert res.forwarded_tokens == q.shape[1] + N_NEW - 1


# ----------------------------------------------------------------------------- two processes
@pytest.fixture(scope="module")
def saved_context(tmp_path_factory):
    """``kvforge prefill`` run in its own process: ``(text file, ctx.kv)``."""
    d = tmp_path_factory.mktemp("two-process")
    text = d / "context.txt"
    text.write_text(passage(), encoding="utf-8")
    ctx = d / "ctx.kv"
    proc = kvforge("prefill", "--model", "smollm2-135m", "--text", text, "-o", ctx)
    assert proc.returncode == 0, proc.stderr
    assert "prefilled" in proc.stdout and ctx.exists()
    return text, ctx


@pytest.mark.integration
def test_two_processes_prefill_then_generate(saved_context, smollm, tmp_path):
    text, ctx = saved_context
    stats_path = tmp_path / "s.json"
    proc = kvforge("generate", "--model", "smollm2-135m", "--cache", ctx, "--prompt", QUESTION,
                   "--max-new-tokens", N_NEW, "--stats-json", stats_path)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(stats_path.read_text())

    model, tok = smollm
    context_ids = tok(text.read_text(encoding="utf-8"), return_tensors="pt").input_ids
    assert stats["cached_context_tokens"] == context_ids.shape[1]
    # the context was never run through the model in the generating process
    assert stats["forwarded_tokens"] == stats["prompt_tokens"] + stats["new_tokens"] - 1
    assert stats["prompt_tokens"] == ids_of(tok, QUESTION, special=False).shape[1]

    # the one-process run: same context ids, same chunking as the CLI default
    state = prefill(model, tok, context_ids, chunk_size=512)
    saved = KVState.load(ctx, model=model)
    assert torch.equal(saved.token_ids, state.token_ids)
    for a, b in zip(saved.layers, state.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
    one = generate(model, tok, QUESTION, max_new_tokens=N_NEW, state=state)
    assert stats["token_ids"] == one.token_ids
    assert stats["new_tokens"] == len(one.token_ids) > 0
    assert proc.stdout.strip() == one.text.strip()


@pytest.mark.integration
def test_state_of_one_model_is_refused_by_another(saved_context):
    _, ctx = saved_context
    proc = kvforge("generate", "--model", "gemma3-270m", "--cache", ctx, "--prompt", "hi", "--max-new-tokens", 2)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kvforge")]
    assert len(errors) == 1 and errors[0].startswith("kvforge generate: error:")
    assert "fingerprint" in errors[0] and "made by" in errors[0]
    assert "smollm2-135m" in errors[0] and "gemma3-270m" in errors[0]


@pytest.mark.integration
def test_corrupted_state_file_is_refused(saved_context, tmp_path):
    _, ctx = saved_context
    data = bytearray(ctx.read_bytes())
    data[-100] ^= 0xFF  # inside the last tensor's bytes
    bad = tmp_path / "bad.kv"
    bad.write_bytes(bytes(data))
    proc = kvforge("generate", "--model", "smollm2-135m", "--cache", bad, "--prompt", "hi", "--max-new-tokens", 2)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "integrity" in proc.stderr.splitlines()[-1]


# ----------------------------------------------------------------------------- inspect
@pytest.mark.integration
def test_inspect_prints_every_layer_and_writes_a_png(tmp_path):
    png = tmp_path / "out.png"
    proc = kvforge("inspect", "--model", "smollm2-135m", "--prompt", "The KV cache of a language model.",
                   "--plot", png)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == list(range(30))
    assert all(r[1] == "full" for r in rows)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


# ----------------------------------------------------------------------------- loading
def test_unknown_model_name_lists_bundled_names():
    with pytest.raises(ModelNotFoundError) as e:
        load_model("no-such-model")
    for name in BUNDLED:
        assert name in str(e.value)
    with pytest.raises(ModelNotFoundError):
        load_model("./no/such/dir")


@pytest.mark.integration
def test_load_model_works_offline():
    code = (
        "import json, kvforge\n"
        "out = {}\n"
        "for name in kvforge.BUNDLED:\n"
        "    model, tok = kvforge.load_model(name)\n"
        "    out[name] = [model.config.model_type, model.kvforge_name, kvforge.fingerprint(model)]\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "KVFORGE_QUIET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out) == set(BUNDLED)
    assert out["smollm2-135m"][0] == "llama" and out["gemma3-270m"][0].startswith("gemma3")
    assert all(v[1] == k and len(v[2]) == 16 for k, v in out.items())
