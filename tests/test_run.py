"""``kvforge.run`` and the public-report kinds it owns: windows start as prompts do, positions, exports
of peers' caches, the residual window, refusals at start-up."""

from __future__ import annotations

import pytest
import torch
from kvhelpers import CONTEXT, ids_of

from kvforge import KVState, build_cache, run
from kvforge.eval import default_prompts, perplexity
from kvforge.quant import QuantConfig, QuantizedKVCache, QuantizedLayer

TEXT = (CONTEXT + " ") * 40


class NoPrefixTokenizer:
    """Like the tests' CharTokenizer but with no BOS (SmolLM2's tokenizer adds no special token)."""

    bos_token_id, eos_token_id = None, 2

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = [3 + b for b in text.encode()]

        class Enc(dict):
            pass

        enc = Enc(input_ids=torch.tensor([ids]) if return_tensors == "pt" else ids)
        enc.input_ids = enc["input_ids"]
        return enc


def test_prompt_prefix(tiny_llama):
    _, tok = tiny_llama
    assert run.prompt_prefix(tok) == [1]
    assert run.prompt_prefix(NoPrefixTokenizer()) == []


@pytest.mark.parametrize("stride", [None, 7])
def test_every_window_starts_as_a_prompt_does(tiny_llama, stride):
    """Every window a metric builds starts with the tokenizer's prefix (``<bos>``), not only the first."""
    _, tok = tiny_llama
    windows = run.token_windows(tok, TEXT, 5, 64, stride=stride)
    body = tok(TEXT, add_special_tokens=False).input_ids
    step = stride or 63
    for i, w in enumerate(windows):
        assert w.shape == (1, 64) and w[0, 0].item() == 1
        assert w[0, 1:].tolist() == body[i * step : i * step + 63]
    for p in default_prompts(tok, 3, 40, TEXT):
        assert p[0, 0].item() == 1 and p.shape == (1, 40)
    plain = run.token_windows(NoPrefixTokenizer(), TEXT, 2, 64)
    assert plain[1][0].tolist() == NoPrefixTokenizer()(TEXT).input_ids[64:128]  # nothing added, nothing lost


def test_perplexity_scores_windows_with_the_prefix(tiny_llama):
    """A window scored without its ``<bos>`` is a different (worse) input: each window's NLL equals the NLL of
    that window run on its own, as a prompt."""
    model, tok = tiny_llama
    res = perplexity(model, tok, "dynamic", text=TEXT, n_windows=2, context=32, score=16, show_progress=False)
    for ids, nll in zip(run.token_windows(tok, TEXT, 2, 48), res.per_window_nll):
        assert ids[0, 0].item() == 1
        logits = model(input_ids=ids).logits[0, 31:-1].float()
        ref = torch.nn.functional.cross_entropy(logits, ids[0, 32:]).item()
        assert nll == pytest.approx(ref, abs=1e-4)


def test_too_little_text_is_an_error(tiny_llama):
    _, tok = tiny_llama
    with pytest.raises(ValueError, match="need"):
        run.token_windows(tok, "short", 2, 100)


def test_forward_owns_positions(tiny_llama):
    model, tok = tiny_llama
    ids = ids_of(tok, CONTEXT)
    whole = model(input_ids=ids).logits[:, -1]
    cache = run.new_cache(model)
    last = run.prefill(model, ids, cache, chunk_size=5)
    assert torch.allclose(last, whole, atol=1e-4) and cache.get_seq_length() == ids.shape[1]
    with pytest.raises(ValueError, match="chunk_size"):
        run.prefill(model, ids, run.new_cache(model), chunk_size=0)


def test_decode_stops_at_eos_and_forces(tiny_llama):
    model, tok = tiny_llama
    ids = ids_of(tok, CONTEXT)
    cache = run.new_cache(model)
    toks, logp = run.decode(model, cache, run.prefill(model, ids, cache), 6)
    assert toks.shape == (1, 6) and logp.shape == (1, 6, 256)
    cache = run.new_cache(model)
    stop, _ = run.decode(model, cache, run.prefill(model, ids, cache), 6, eos={int(toks[0, 2])})
    assert stop[0].tolist() == toks[0, :3].tolist()


@pytest.mark.parametrize("tokens", [16, 17, 33, 65, 100])
def test_transformers_quantized_cache_exports_after_a_full_flush(tiny_llama, tokens):
    """transformers' QuantizedCache holds a 1-D empty residual right after it quantizes everything (every
    ``residual_length`` tokens); exporting then must work, not raise IndexError."""
    pytest.importorskip("optimum.quanto")
    model, _ = tiny_llama
    ids = torch.randint(3, 200, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    cache = build_cache("hf-quantized:nbits=4,q_group_size=16,residual_length=16", model)
    run.prefill(model, ids, cache)
    state = KVState.from_cache(cache, model, ids)
    assert all(layer.length == tokens for layer in state.layers)
    assert all(layer.meta.get("lossy") for layer in state.layers)  # marked: codes were not exportable
    ref = run.new_cache(model)
    run.prefill(model, ids, ref)
    err = (state.layers[0].keys - ref.layers[0].keys).abs().max() / ref.layers[0].keys.abs().max()
    assert err < 0.2  # dequantized, 4-bit


def test_server_refuses_an_unrestorable_spec_with_the_prefix_store_at_start_up(tiny_llama):
    from kvforge.serve.server import ServeConfig, build
    from kvforge.specs import CacheNotRestorableError

    model, tok = tiny_llama
    pytest.importorskip("optimum.quanto")
    with pytest.raises(CacheNotRestorableError, match="hf-quantized.*--no-store"):
        build(ServeConfig(cache="hf-quantized:q_group_size=16,residual_length=16"), model, tok)
    _, engine = build(ServeConfig(cache="hf-quantized:q_group_size=16,residual_length=16", no_store=True), model, tok)
    engine.stop()


@pytest.mark.parametrize("residual,group", [(64, 64), (64, 32), (32, 8), (0, 16)])
def test_residual_window_is_what_the_docs_say(tiny_llama, residual, group):
    """The full-precision window holds at most ``residual_length`` tokens: after 65, 129, 193 tokens with a
    64-token window and 64-token key groups it holds 1 (the oldest whole groups are quantized)."""
    model, tok = tiny_llama
    cfg = QuantConfig(key_group=group, value_group=16, residual_length=residual)
    cache = QuantizedKVCache([cfg] * 3)
    layer = cache.layers[0]
    for n in range(1, 200):
        k = torch.randn(1, 2, 1, 16)
        layer.update(k, k.clone())
        held = layer.stored_tokens - layer.quantized_tokens
        assert held == QuantizedLayer.residual_tokens_after(n, residual, group)
        assert held <= max(residual, 0) or (residual == 0 and held == n % group)
        assert n <= residual or held > residual - group
    if (residual, group) == (64, 64):
        assert [QuantizedLayer.residual_tokens_after(n, 64, 64) for n in (64, 65, 129, 193)] == [64, 1, 1, 1]


@pytest.mark.integration
def test_bundled_gemma_windows_and_prompts_start_with_bos():
    """The public-report input: ``kvforge eval ppl --model gemma3-270m`` scored every window after the first
    without ``<bos>`` (NLL 4.25 instead of 3.20). Every window and prompt a metric builds now starts with it."""
    from transformers import AutoTokenizer

    from kvforge.models import bundled_dir
    from kvforge.texts import load_text

    tok = AutoTokenizer.from_pretrained(bundled_dir("gemma3-270m"))
    text = load_text("pydoc", "eval")
    assert run.prompt_prefix(tok) == [tok.bos_token_id]
    for ids in run.token_windows(tok, text, 4, 1024) + default_prompts(tok, 4, 256, text):
        assert ids[0, 0].item() == tok.bos_token_id and (ids[0, 1:] != tok.bos_token_id).all()
