"""kvforge.quant on the bundled models: quality, Gemma's sliding layers, the CLI."""

from __future__ import annotations

import json

import pytest
from kvhelpers import run_cli

from kvforge import generate
from kvforge.eval import agreement, default_prompts, perplexity, token_windows
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
    assert abs(two.rel_change) < 0.10  # one window: with its 8-bit window and sinks 2bit can land below 0
    assert two.rel_change < plain_two.rel_change  # the rotation is what keeps 2-bit usable
    fp16 = base.bytes_per_token / 2  # the model runs float32
    assert fp16 / safe.bytes_per_token > 2.9 and fp16 / two.bytes_per_token > 3.1


def test_gemma_sliding_layers_work_past_the_window(real_gemma):
    """700-token contexts, past Gemma 3's 512-token window: quality stays close to a DynamicCache
    (teacher-forced KL, decode-faithful perplexity) and sliding layers stay bounded."""
    model, tok = real_gemma
    text = load_text("pydoc", "eval")
    prompts = default_prompts(tok, 1, 700, text)
    a = agreement(model, tok, "kvforge-quant:preset=safe", prompts=prompts, new_tokens=16, show_progress=False)
    assert a.mean_kl < 0.05
    windows = token_windows(tok, text, 1, 900)
    kw = dict(windows=windows, context=700, score=200, show_progress=False)
    base = perplexity(model, tok, "dynamic", **kw)
    safe = perplexity(model, tok, "kvforge-quant:preset=safe", baseline=base, **kw)
    assert abs(safe.rel_change) < 0.06  # measured +3.2% (SmolLM2: +0.07%); see the issue notes
    cache = QuantizedKVCache.for_model(model, "safe")
    generate(model, tok, text[:4000], max_new_tokens=4, cache=cache)
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
