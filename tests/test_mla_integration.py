"""kvforge.mla on the bundled SmolLM2: exact at full rank in chunked decoding (the RoPE test), quality at
2x, save and load through ``kvforge.load_model``."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from kvforge import generate, load_model
from kvforge.eval import perplexity
from kvforge.eval.common import token_windows
from kvforge.mla import compression, convert, read_config
from kvforge.run import cache_kw
from kvforge.texts import load_text, text_pieces

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cal():
    return text_pieces(load_text("pydoc", "calibration"), 8, 2200)


@torch.inference_mode()
def _chunked(model, ids, chunk=32):
    cache = DynamicCache(config=model.config)
    return torch.cat([model(input_ids=ids[:, s:s + chunk], **cache_kw(cache), use_cache=True).logits
                      for s in range(0, ids.shape[1], chunk)], 1)


def test_full_rank_is_the_original_model_in_chunked_decoding(smollm, cal):
    """The rotary base (100000 here) comes from the model: at full rank the converted model's chunked
    decoding gives the original logits and greedy tokens."""
    model, tok = smollm
    m = copy.deepcopy(model)
    convert(m, tok, rank=10**6, method="joint", calibration=cal)
    ids = token_windows(tok, load_text("pydoc", "eval"), 1, 256)[0]
    assert torch.allclose(_chunked(m, ids), _chunked(model, ids), atol=2e-3)
    prompt = "The history of the Python programming language begins"
    assert generate(m, tok, prompt, max_new_tokens=16).token_ids == generate(model, tok, prompt,
                                                                              max_new_tokens=16).token_ids


def test_full_rank_gemma_keeps_both_rotary_bases_and_decodes_on_latents(real_gemma, cal):
    """Gemma 3 270M (sliding layers with base 10k, full layers with 1M, q/k norms, one KV head of 256):
    at full rank joint is the original in chunked decoding; decoupled_rope with every pair kept too, and
    its attention on the latents (absorbed) equals decompressing."""
    model, tok = real_gemma
    ids = token_windows(tok, load_text("pydoc", "eval"), 1, 160)[0]
    ref = _chunked(model, ids)
    m = copy.deepcopy(model)
    convert(m, tok, rank=10**6, method="joint", calibration=cal[:2])
    assert torch.allclose(_chunked(m, ids), ref, atol=2e-3)
    m = copy.deepcopy(model)
    convert(m, tok, rank=10**6, method="decoupled_rope", rope_pairs=model.config.head_dim // 2, calibration=cal[:2])
    absorbed = _chunked(m, ids)
    assert torch.allclose(absorbed, ref, atol=2e-3)
    for layer in m.model.layers:
        layer.self_attn.absorb = False
    assert torch.allclose(_chunked(m, ids), absorbed, atol=2e-3)


def test_cli_convert_then_bench_and_generate_with_the_directory(smollm, tmp_path, capsys):
    """``kvforge mla convert`` at 2x writes a directory that ``load_model``, ``--model`` and ``bench --variants``
    accept, at half the cache bytes and close in perplexity (the 2x defaults: Fisher weights, bias and output
    correction); quantized latents sit beside it in the same results; a directory that is not a conversion is
    refused by name. (Saving and loading back exactly is tested on tiny models in test_mla.py.)"""
    import json

    from kvforge.cli import main

    out = tmp_path / "smol-2x"
    assert main(["mla", "convert", "--model", "smollm2-135m", "--ratio", "2", "--calibration-pieces", "4",
                 "--rank-multiple", "8", "--output-aware", "on", "--output-correction", "local", "--correction-damping", "0.5",
                 "-o", str(out)]) == 0
    assert "2.00x smaller" in capsys.readouterr().out
    cfg = read_config(out)
    assert (cfg.output_aware, cfg.output_correction, cfg.correction_damping) == (True, "local", 0.5)
    model, tok = smollm
    back, _ = load_model(str(out))
    assert compression(back) == pytest.approx(2.0, rel=0.01)
    windows = token_windows(tok, load_text("pydoc", "eval"), 1, 512)
    ref = perplexity(model, tok, windows=windows, context=256, score=256, show_progress=False)
    got = perplexity(back, tok, windows=windows, context=256, score=256, show_progress=False)
    assert got.ppl < ref.ppl * 1.15  # README, MLA: +5% on pydoc with the defaults and 32 calibration pieces
    assert main(["generate", "--model", str(out), "--prompt", "def add(a, b):", "--max-new-tokens", "4"]) == 0
    spec = "kvforge-quant:preset=safe,rotate=none,fused=off"
    assert main(["bench", "--model", "smollm2-135m", "--variants", str(out), "--caches", spec, "--metrics", "ppl",
                 "--windows", "1", "--context", "128", "--score", "64", "--size-tokens", "0",
                 "--out", str(tmp_path / "res")]) == 0
    folder = next((tmp_path / "res").iterdir())
    rows = {r["cache"]: r for r in json.loads((folder / "results.json").read_text())["results"]}
    latent, quantized = rows["smol-2x + dynamic"]["ppl"], rows[f"smol-2x + {spec}"]["ppl"]
    assert quantized["bytes_per_token"] < latent["bytes_per_token"] < rows["dynamic"]["ppl"]["bytes_per_token"]
    assert quantized["ppl"] < rows["dynamic"]["ppl"]["ppl"] * 1.3
    assert main(["bench", "--model", "smollm2-135m", "--variants", str(tmp_path), "--caches", "dynamic",
                 "--metrics", "ppl", "--out", str(tmp_path / "res")]) == 2
    assert "not a converted model directory" in capsys.readouterr().err
