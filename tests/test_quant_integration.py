"""kvforge.quant on the bundled models: quality, Gemma's sliding layers, the CLI."""

from __future__ import annotations

import json

import pytest
from kvhelpers import run_cli

from kvforge import generate
from kvforge.eval import perplexity, token_windows
from kvforge.quant import QuantizedKVCache
from kvforge.texts import load_text

pytestmark = pytest.mark.integration


def test_safe_preset_keeps_perplexity_and_shrinks_bytes(smollm):
    model, tok = smollm
    windows = token_windows(tok, load_text("pydoc", "eval"), 1, 768)
    kw = dict(windows=windows, context=512, score=256, show_progress=False)
    base = perplexity(model, tok, "dynamic", **kw)
    safe = perplexity(model, tok, "kvforge-quant:preset=safe", baseline=base, **kw)
    two = perplexity(model, tok, "kvforge-quant:preset=2bit", baseline=base, **kw)
    plain_two = perplexity(model, tok, "kvforge-quant:preset=2bit,rotate=none", baseline=base, **kw)
    assert abs(safe.rel_change) < 0.01
    assert 0 < two.rel_change < 0.10
    assert two.rel_change < plain_two.rel_change  # the rotation is what keeps 2-bit usable
    fp16 = base.bytes_per_token / 2  # the model runs float32
    assert fp16 / safe.bytes_per_token > 2.9 and fp16 / two.bytes_per_token > 3.1


def test_gemma_sliding_layers_generate_with_the_quantized_cache(real_gemma):
    model, tok = real_gemma
    text = load_text("pydoc", "eval")[:4000]  # ~900 tokens: past Gemma's 512-token window
    ref = generate(model, tok, text, max_new_tokens=12)
    cache = QuantizedKVCache.for_model(model, "safe")
    out = generate(model, tok, text, max_new_tokens=12, cache=cache)
    assert ref.prompt_tokens > 600
    assert sum(a == b for a, b in zip(out.token_ids, ref.token_ids)) >= 8
    sliding = [layer for layer in cache.layers if layer.sliding_window]
    assert sliding and all(layer.stored_tokens < 512 + 64 + layer.config.residual_length for layer in sliding)


def test_cli_recommend_and_validate():
    r = run_cli("quant", "recommend", "--model", "smollm2-135m", "--tokens", "128", "--json")
    report = json.loads(r.stdout)
    assert len(report["layers"]) == 30 and set(report["recommended"]) == {"quality", "balanced"}
    r = run_cli("validate", "--model", "smollm2-135m", "--cache", "kvforge-quant:preset=safe", "--prompts", "1",
                 "--prompt-tokens", "128", "--new-tokens", "8", "--min-match", "0", "--json")
    assert json.loads(r.stdout)["pass"] is True
    bad = run_cli("validate", "--model", "smollm2-135m", "--cache", "kvforge-quant:preset=huge", check=False)
    assert bad.returncode == 2 and "unknown preset" in bad.stderr
