"""The evaluation harness on tiny models: each metric, and a deliberately corrupted cache scoring worse."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kvforge.eval import (
    BenchSettings,
    agreement,
    cache_factory,
    make_haystack,
    needle,
    perplexity,
    run_bench,
    token_windows,
)
from kvforge.specs import _REGISTRY, UnknownCacheSpecError, register

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def _windows(tok, n=2, length=96):
    return token_windows(tok, TEXT, n, length)


@pytest.fixture(scope="module")
def trained():
    """The tiny Llama trained to copy repeated random words (tests/data/make_copy_model.py): its
    predictions need its past, so a corrupted cache must make them measurably worse."""
    from pathlib import Path

    from conftest import TINY, CharTokenizer
    from data.make_copy_model import copy_text
    from safetensors.torch import load_file

    model = TINY["llama"]()
    weights = load_file(str(Path(__file__).parent / "data" / "copy_llama.safetensors"))
    model.load_state_dict(weights)
    return model, CharTokenizer(), copy_text()


def test_decode_faithful_matches_single_pass_for_a_lossless_cache(tiny):
    model, tok = tiny
    w = _windows(tok)
    dec = perplexity(model, tok, "dynamic", windows=w, context=64, score=32, chunk=8, show_progress=False)
    one = perplexity(model, tok, "dynamic", windows=w, context=64, score=32, single_pass=True, show_progress=False)
    assert dec.tokens == one.tokens == 2 * 32
    assert dec.ppl == pytest.approx(one.ppl, rel=1e-4)
    assert dec.nll == pytest.approx(math.log(dec.ppl))
    # every scored token is counted once, whatever the chunking
    other = perplexity(model, tok, "dynamic", windows=w, context=64, score=32, chunk=5, show_progress=False)
    assert other.ppl == pytest.approx(dec.ppl, rel=1e-4)


def test_perplexity_matches_a_hand_computed_reference(tiny_llama):
    model, tok = tiny_llama
    w = _windows(tok, n=1, length=48)
    r = perplexity(model, tok, "dynamic", windows=w, context=40, score=8, chunk=3, show_progress=False)
    with torch.no_grad():
        logits = model(w[0]).logits[0, 39:47]
    nll = torch.nn.functional.cross_entropy(logits, w[0][0, 40:48]).item()
    assert r.nll == pytest.approx(nll, rel=1e-4)


def test_corrupted_cache_is_detected_by_every_metric(trained):
    model, tok, text = trained
    w = token_windows(tok, text, 2, 96)
    base = perplexity(model, tok, "dynamic", windows=w, context=64, score=32, chunk=8, show_progress=False)
    bad = perplexity(model, tok, "noisy:std=1.0", windows=w, context=64, score=32, chunk=8, baseline=base,
                     show_progress=False)
    assert base.ppl < 8  # the model learned to copy
    assert bad.rel_change > 0.05
    same = perplexity(model, tok, "preallocated:max_seq_len=128", windows=w, context=64, score=32, chunk=8,
                      baseline=base, show_progress=False)
    assert abs(same.rel_change) < 1e-4

    prompts = [w[0][:, :40], w[1][:, :40]]
    ok = agreement(model, tok, "dynamic", prompts=prompts, new_tokens=12, show_progress=False)
    assert ok.match_rate == 1.0 and ok.exact == 1.0
    assert ok.first_divergence == [None, None] and ok.mean_kl < 1e-6
    worse = agreement(model, tok, "noisy:std=1.0", prompts=prompts, new_tokens=12, show_progress=False)
    assert worse.mean_kl > 1e-3
    assert worse.max_kl >= worse.mean_kl


def test_agreement_reports_first_divergence_position(tiny_llama):
    model, tok = tiny_llama
    prompts = [_windows(tok, 1, 40)[0]]
    r = agreement(model, tok, "noisy:std=3.0", prompts=prompts, new_tokens=16, show_progress=False)
    d = r.first_divergence[0]
    if d is None:
        assert r.match_rate == 1.0
    else:
        assert 0 <= d < 16 and r.match_rate < 1.0


def test_needle_haystack_places_the_fact_at_the_requested_depth(tiny_llama):
    _, tok = tiny_llama
    text = "\n".join(f"line {i} of some filler text." for i in range(400))
    for depth in (0.0, 0.5, 1.0):
        doc, q = make_haystack(tok, text, 800, depth, "Alice", "12345")
        at = doc.index("Alice's secret number is 12345.")
        assert abs(at / len(doc) - depth) < 0.15
        assert "Alice's secret number" in q
    with pytest.raises(ValueError, match="too short"):
        make_haystack(tok, text, 10, 0.5, "Alice", "12345")


def test_needle_grid_shape_and_records(tiny_gemma):
    model, tok = tiny_gemma
    text = "\n".join(f"line {i} of some filler text." for i in range(2000))
    r = needle(model, tok, "dynamic", lengths=(160, 200), depths=(0.0, 1.0), trials=2, text=text, max_new_tokens=4,
               show_progress=False)
    assert len(r.accuracy) == 2 and all(len(row) == 2 for row in r.accuracy)
    assert len(r.records) == 8
    assert all(0.0 <= a <= 1.0 for row in r.accuracy for a in row)
    with pytest.raises(ValueError, match="depths"):
        needle(model, tok, "dynamic", depths=(1.5,), text=text, show_progress=False)


def test_any_cache_factory_is_accepted(tiny_llama):
    from transformers import DynamicCache

    model, tok = tiny_llama

    def my_cache(m):
        return DynamicCache(config=m.config)

    label, factory = cache_factory(my_cache)
    assert label == "my_cache" and isinstance(factory(model), DynamicCache)
    r = perplexity(model, tok, my_cache, windows=_windows(tok, 1), context=64, score=32, show_progress=False)
    assert r.cache == "my_cache" and r.tokens == 32
    with pytest.raises(UnknownCacheSpecError, match="known: "):
        perplexity(model, tok, "no-such-cache", windows=_windows(tok, 1), context=64, score=32)
    with pytest.raises(TypeError):
        cache_factory(42)


def test_too_little_text_is_an_error(tiny_llama):
    _, tok = tiny_llama
    with pytest.raises(ValueError, match="windows"):
        token_windows(tok, "short", 2, 100)


@pytest.fixture
def missing_peer():
    @register("fake-peer", {}, "a peer whose package is not installed", requires=("no_such_module_kvforge",))
    def _fake(model):  # pragma: no cover - never built
        raise AssertionError

    yield "fake-peer"
    _REGISTRY.pop("fake-peer", None)


def test_bench_writes_a_results_folder_and_never_overwrites(tiny_llama, tmp_path, missing_peer):
    model, tok = tiny_llama
    text_file = tmp_path / "text.txt"
    text_file.write_text("\n".join(f"line {i}: the quick brown fox jumps over the lazy dog." for i in range(600)))
    s = BenchSettings(
        model="tiny-llama", caches=["noisy:std=1.0", missing_peer], text=str(text_file), split="all", windows=2,
        context=48, score=24, chunk=8, agree_prompts=2, agree_prompt_tokens=32, agree_tokens=6,
        needle_lengths=[160], needle_depths=[0.0, 1.0], needle_trials=1,
    )
    out = run_bench(s, tmp_path / "results", model=model, tokenizer=tok)
    data = json.loads((out / "results.json").read_text())
    rows = {r["cache"]: r for r in data["results"]}
    assert list(rows) == ["dynamic", "noisy:std=1.0", "fake-peer"]
    assert "skipped" in rows["fake-peer"] and "no_such_module_kvforge" in rows["fake-peer"]["skipped"]
    assert rows["dynamic"]["ppl"]["rel_change"] == 0.0
    assert rows["noisy:std=1.0"]["ppl"]["rel_change"] > 0
    assert rows["noisy:std=1.0"]["agree"]["mean_kl"] > rows["dynamic"]["agree"]["mean_kl"]
    md = (out / "results.md").read_text()
    assert "| noisy:std=1.0 |" in md and "skipped" in md
    for png in ("quality_vs_bytes.png", "needle_heatmap.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    again = run_bench(s, tmp_path / "results", model=model, tokenizer=tok)
    assert again != out and again.name == out.name + "-2"
    assert out.name.startswith("tiny-llama_w2x48+24_k8")


def test_bench_over_several_texts_reports_each_the_mean_and_the_worst(tiny_llama, tmp_path):
    model, tok = tiny_llama
    files = []
    for i, words in enumerate(["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine, they say"]):
        f = tmp_path / f"text{i}.txt"
        f.write_text("\n".join(f"{j}: {words}." for j in range(400)))
        files.append(str(f))
    s = BenchSettings(model="tiny-llama", caches=["noisy:std=0.5"], metrics=["ppl"], text=",".join(files),
                      split="all", windows=1, context=48, score=24, chunk=8, size_tokens=256)
    out = run_bench(s, tmp_path / "results", model=model, tokenizer=tok)
    data = json.loads((out / "results.json").read_text())
    rows = [(r["cache"], r["text"].rsplit("/", 1)[-1]) for r in data["results"]]  # paths are stored portably
    assert rows == [(c, f"text{i}.txt") for i in range(2) for c in ("dynamic", "noisy:std=0.5")]
    noisy = next(e for e in data["summary"] if e["cache"] == "noisy:std=0.5")
    ch = noisy["rel_change"]
    assert len(ch) == 2 and noisy["mean_rel_change"] == pytest.approx(sum(ch.values()) / 2)
    assert noisy["worst_rel_change"] == max(ch.values()) and ch[noisy["worst_text"]] == noisy["worst_rel_change"]
    assert noisy["size"]["tokens"] == 256 and noisy["size"]["bytes_per_token"] > 0
    md = (out / "results.md").read_text()
    assert "| mean | worst |" in md and md.count("## ") == 3  # the summary and one section per text
    assert (out / "quality_vs_bytes.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="unknown text"):
        BenchSettings(model="m", caches=["dynamic"], text="pydoc,no-such-text").validate()
    short = tmp_path / "short.txt"
    short.write_text("too short to cut a window from")
    s.text = f"{files[0]},{short}"
    with pytest.raises(ValueError, match="text '.*short.txt'.*tokens"):
        run_bench(s, tmp_path / "results", model=model, tokenizer=tok)


def test_bench_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown metric"):
        BenchSettings(model="m", caches=["dynamic"], metrics=["speed"]).validate()
    with pytest.raises(UnknownCacheSpecError):
        BenchSettings(model="m", caches=["dynamic", "bogus"]).validate()
