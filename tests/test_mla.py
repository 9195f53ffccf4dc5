"""kvforge.mla mechanics on tiny random models: exactness at full rank (RoPE read from the model), latents
in the cache, absorption equal to decompression, rank allocation, save/load, composition with KVState."""

from __future__ import annotations

import copy

import pytest
import torch
from kvhelpers import one_thread
from transformers import DynamicCache

from kvforge import KVState, generate
from kvforge.mla import METHODS, allocate, calibrate, compression, convert, kv_bytes_per_token, save_converted
from kvforge.models import fingerprint
from kvforge.run import cache_kw

CAL = ["the quick brown fox jumps over the lazy dog, " * 3, "pack my box with five dozen liquor jugs; " * 3]
TEXT = "sphinx of black quartz, judge my vow. how vexingly quick daft zebras jump over sliding windows " * 2


def _chunked_logits(model, ids, chunk=5):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        return torch.cat([model(input_ids=ids[:, s:s + chunk], **cache_kw(cache), use_cache=True).logits
                          for s in range(0, ids.shape[1], chunk)], 1), cache


def _converted(tiny, **kw):
    model, tok = tiny
    m = copy.deepcopy(model)
    with one_thread():
        cfg = convert(m, tok, calibration=CAL, **kw)
    return m, tok, cfg


@pytest.mark.parametrize("method", METHODS)
def test_full_rank_reproduces_the_model_in_chunked_decoding(tiny, method):
    """At full rank every method is the original model: keys re-rotated with the model's own rotary
    module (per layer type) give the same logits in chunked decoding as the unconverted model."""
    model, tok = tiny
    d = model.config.head_dim
    m, _, _ = _converted(tiny, rank=10**6, method=method, rope_pairs=d // 2)
    ids = tok(TEXT, return_tensors="pt").input_ids
    with one_thread():
        ref, _ = _chunked_logits(model, ids)
        got, cache = _chunked_logits(m, ids)
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
    assert cache.layers[-1].keys.shape[1] == 1  # the cache holds latents, not per-head keys


@pytest.mark.parametrize("ratio", [2.0, 4.0])
def test_decode_on_latents_equals_decompressing(tiny, ratio):
    """decoupled_rope: attention on the latents with absorbed up-projections gives what rebuilding the
    past's keys and values gives; the cache holds 1/ratio of the original bytes."""
    m, tok, cfg = _converted(tiny, ratio=ratio, method="decoupled_rope", rope_pairs=2)
    ids = tok(TEXT, return_tensors="pt").input_ids
    with one_thread():
        absorbed, cache = _chunked_logits(m, ids)
        for layer in m.model.layers:
            layer.self_attn.absorb = False
        decompressed, _ = _chunked_logits(m, ids)
    assert torch.allclose(absorbed, decompressed, atol=1e-4)
    assert compression(m) == pytest.approx(ratio, rel=0.02)
    held = sum(layer.keys[0, :, :1].numel() + layer.values[0, :, :1].numel() for layer in cache.layers)
    assert held * 2 == kv_bytes_per_token(m)  # bytes counted are the numbers the cache holds per token


def test_lower_rank_costs_quality_monotonically(tiny):
    model, tok = tiny
    ids = tok(TEXT, return_tensors="pt").input_ids
    with one_thread():
        ref, _ = _chunked_logits(model, ids)
        errs = []
        for ratio in (1.5, 3.0, 6.0):
            m, _, _ = _converted(tiny, ratio=ratio, method="joint")
            errs.append((_chunked_logits(m, ids)[0] - ref).abs().mean().item())
    assert errs[0] < errs[1] < errs[2]


def test_output_aware_factors_minimise_the_weighted_error_with_orthonormal_up(tiny):
    """With output-aware weights the rank-r factors are the best rank-r fit in the weighted, whitened norm
    (Eckart-Young: no smaller than plain whitening's error in that norm), and the QR re-basing keeps
    the up-projection orthonormal and the product ``up @ down`` unchanged."""
    from kvforge.mla.convert import _left_weights, attention_modules

    model, tok = tiny
    with one_thread():
        stats = calibrate(model, tok, CAL)
    a0 = attention_modules(model)[0]
    w = torch.cat([a0.k_proj.weight, a0.v_proj.weight]).double()
    import inspect

    default_key_weight = inspect.signature(convert).parameters["key_weight"].default
    left = _left_weights(a0, stats, 0, "joint", None, default_key_weight)["kv"]
    chol = torch.linalg.cholesky(stats["cov"][0] + 1e-6 * torch.eye(w.shape[1], dtype=torch.float64))
    rank = w.shape[0] // 2

    def weighted_err(m):
        new = attention_modules(m)[0]
        approx = new.up.double() @ new.down.weight.double()
        return (left @ (approx - w) @ chol).norm().item(), new

    aware, new = weighted_err(_converted(tiny, rank=rank, method="joint", output_aware=True, bias_correction=False)[0])
    plain, _ = weighted_err(_converted(tiny, rank=rank, method="joint", output_aware=False, bias_correction=False)[0])
    assert aware < plain * 0.99  # strictly better in its own norm: the weights were used
    up = new.up.double()
    assert torch.allclose(up.T @ up, torch.eye(rank, dtype=torch.float64), atol=1e-5)


def test_allocation_spends_the_budget_and_favours_concentrated_spectra():
    flat, steep = torch.ones(16), torch.tensor([10.0] * 2 + [0.1] * 14)
    ranks = allocate([flat, steep], 12, floor=1)
    assert sum(ranks) == 12 and ranks[0] > ranks[1] >= 2
    assert allocate([flat, steep], 100) == [16, 16]
    with pytest.raises(ValueError, match="below the floor"):
        allocate([flat, steep], 3, floor=2)


def test_calibration_reads_the_normalised_input_of_k_proj(tiny):
    """The covariance is of what k_proj receives (after the input norm), not the residual stream."""
    model, tok = tiny
    ids = tok(CAL[0], return_tensors="pt").input_ids
    with torch.no_grad(), one_thread():
        stats = calibrate(model, tok, [CAL[0]])
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))[0].double()
    assert torch.allclose(stats["cov"][0], x.T @ x / x.shape[0], atol=1e-6)


def test_save_load_round_trip_and_kv_state(tiny, tmp_path):
    """A converted model saved and loaded gives identical logits, has its own fingerprint, and its latent
    cache goes through KVState export/save/load: continuing from it equals an uninterrupted run."""
    m, tok, cfg = _converted(tiny, ratio=2.0, method="decoupled_rope", rope_pairs=2)
    save_converted(m, None, tmp_path / "conv")
    from kvforge.mla import load_converted

    back = load_converted(tmp_path / "conv")
    ids = tok(TEXT, return_tensors="pt").input_ids
    with one_thread():
        a, cache = _chunked_logits(m, ids)
        b, _ = _chunked_logits(back, ids)
        assert torch.equal(a, b)
        assert fingerprint(back) == fingerprint(m) != fingerprint(tiny[0])
        state = KVState.from_cache(cache, m, ids)
        state.save(tmp_path / "ctx.kv")
        loaded = KVState.load(tmp_path / "ctx.kv")
        g1 = generate(back, tok, "?", max_new_tokens=5, state=loaded, stop_at_eos=False)
        g2 = generate(m, tok, torch.cat([ids, tok("?", add_special_tokens=False, return_tensors="pt").input_ids], 1),
                      max_new_tokens=5, stop_at_eos=False)
    assert g1.token_ids == g2.token_ids
    attns = [layer.self_attn for layer in m.model.layers]
    assert state.nbytes == sum(la.length * a.cache_dims() * 4 for la, a in zip(state.layers, attns))  # float32
    with pytest.raises(Exception, match="model"):
        KVState.load(tmp_path / "ctx.kv").to_cache(tiny[0])  # the unconverted model refuses a latent state


def test_bad_arguments_are_named(tiny):
    model, tok = tiny
    m = copy.deepcopy(model)
    with pytest.raises(ValueError, match="exactly one of"):
        convert(m, tok, calibration=CAL)
    with pytest.raises(ValueError, match="ratio must be >= 1"):
        convert(m, tok, ratio=0.5, calibration=CAL)
    with pytest.raises(ValueError, match="unknown MLA method"):
        convert(m, tok, ratio=2, method="svd", calibration=CAL)
    with pytest.raises(ValueError, match="calibration texts are required"):
        convert(m, tok, ratio=2)
    with one_thread():
        convert(m, tok, ratio=2, whiten=False, method="joint")
    with pytest.raises(ValueError, match="already converted"):
        convert(m, tok, ratio=2, calibration=CAL)


def test_finetune_lowers_kl_keeps_up_projections_orthonormal_and_resumes(tiny, tmp_path):
    from kvforge.mla.finetune import FinetuneConfig, finetune, orthonormality_error

    model, tok = tiny
    text = TEXT * 6  # mechanics only: the tiny model's KL is small, so train and validate on the same text
    cfg = FinetuneConfig(steps=6, lr=1e-4, stiefel_lr=1e-4, seq_len=32, batch=1, val_windows=2, eval_every=3,
                         checkpoint_every=3)
    with one_thread():
        m, _, _ = _converted(tiny, ratio=4.0, method="decoupled_rope", rope_pairs=2)
        frozen = {n: p.clone() for n, p in m.named_parameters() if "q_proj" in n or "mlp" in n}
        rep = finetune(m, model, tok, cfg, text, TEXT * 3, show_progress=False, log=lambda *_: None)
        part, _, _ = _converted(tiny, ratio=4.0, method="decoupled_rope", rope_pairs=2)
        finetune(part, model, tok, FinetuneConfig(**{**cfg.__dict__, "steps": 3}), text, TEXT * 3,
                 checkpoint_dir=tmp_path, show_progress=False, log=lambda *_: None)
        again, _, _ = _converted(tiny, ratio=4.0, method="decoupled_rope", rope_pairs=2)
        msgs = []
        finetune(again, model, tok, cfg, text, TEXT * 3, checkpoint_dir=tmp_path, show_progress=False,
                 log=msgs.append)
    kl = [h["kl"] for h in rep.history]
    assert kl[-1] < kl[0]
    assert orthonormality_error(m) < 1e-5
    assert all(torch.equal(p, dict(m.named_parameters())[n]) for n, p in frozen.items())
    assert any("resumed" in x for x in msgs)
    for (n, a), b in zip(m.state_dict().items(), again.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), n
    assert m.kvforge_mla.finetune["steps_done"] == 6


QSPEC = "kvforge-quant:key_bits=4,value_bits=4,key_group=8,value_group=8,residual=8,rotate=none,fused=off"


@pytest.mark.parametrize("method", ["joint", "separate"])
def test_quantized_latents_compose_with_kv_state(tiny, method, tmp_path):
    """kvforge.quant holds the latents (keys and values of different widths, or no values at all): close to
    the fp latents, fewer bytes, and its codes survive KVState save/load (continuing equals not stopping)."""
    from kvforge import build_cache, cache_nbytes

    m, tok, _ = _converted(tiny, ratio=2.0, method=method, rank_multiple=8)
    ids = tok(TEXT, return_tensors="pt").input_ids
    with torch.no_grad(), one_thread():
        ref, dense = _chunked_logits(m, ids)
        q = build_cache(QSPEC, m)
        got = torch.cat([m(input_ids=ids[:, s:s + 5], **cache_kw(q), use_cache=True).logits
                         for s in range(0, ids.shape[1], 5)], 1)
        assert (got.softmax(-1) - ref.softmax(-1)).abs().max() < 0.05
        assert cache_nbytes(q) < cache_nbytes(dense) / 3
        state = KVState.from_cache(q, m, ids)
        assert state.layers[0].kind == "kvforge-quant"
        state.save(tmp_path / "q.kv")
        more = tok("?!", add_special_tokens=False, return_tensors="pt").input_ids
        resumed = KVState.load(tmp_path / "q.kv").to_cache(m, cache=build_cache(QSPEC, m))
        a = m(input_ids=more, **cache_kw(resumed), use_cache=True).logits
        b = m(input_ids=more, **cache_kw(q), use_cache=True).logits
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="latents"):
        build_cache(QSPEC.replace("fused=off", "fused=on"), m)


def test_bench_places_converted_models_beside_caches(tiny, tmp_path):
    """``kvforge bench --variants DIR``: a converted model runs with every cache on the same windows, rows
    labelled by directory; a directory converted from another model is refused by name."""
    from kvforge.eval import BenchSettings, run_bench

    model, tok = tiny
    m, _, _ = _converted(tiny, ratio=2.0, method="joint", rank_multiple=8)
    save_converted(m, None, tmp_path / "conv2x")
    settings = BenchSettings(model="tiny", caches=[QSPEC], metrics=["ppl"], windows=1, context=24, score=16,
                             chunk=8, variants=[str(tmp_path / "conv2x")])
    with one_thread():
        out = run_bench(settings, tmp_path / "res", model=model, tokenizer=tok)
    import json

    rows = {r["cache"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert {"dynamic", "conv2x + dynamic", f"conv2x + {QSPEC}"} <= set(rows)
    assert rows["conv2x + dynamic"]["ppl"]["bytes_per_token"] == pytest.approx(
        rows["dynamic"]["ppl"]["bytes_per_token"] / 2, rel=0.01)
    assert rows[f"conv2x + {QSPEC}"]["ppl"]["bytes_per_token"] < rows["conv2x + dynamic"]["ppl"]["bytes_per_token"]
    other = copy.deepcopy(model)
    other.model.embed_tokens.weight.data.add_(1.0)
    with pytest.raises(ValueError, match="converted from another model"):
        run_bench(settings, tmp_path / "res", model=other, tokenizer=tok)
