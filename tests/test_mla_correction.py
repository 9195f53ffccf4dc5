"""kvforge.mla output correction on tiny random models: each layer's o_proj refitted by least squares to map
the latent attention's output onto the original attention's, on the same hidden states."""

from __future__ import annotations

import copy

import pytest
import torch
from kvhelpers import one_thread
from torch import nn

from kvforge.mla import convert
from kvforge.mla.attention import attention_modules
from kvforge.mla.convert import conversion_defaults
from kvforge.mla.correction import correct_outputs

CAL = ["the quick brown fox jumps over the lazy dog, " * 3, "pack my box with five dozen liquor jugs; " * 3]
OFF = {"output_aware": False, "bias_correction": False, "allocation": "spectrum", "refine": 0}


def _converted(tiny, rank=4, **kw):
    """A converted copy and the original attention modules it replaced (o_proj shared with the copy)."""
    model, tok = tiny
    m = copy.deepcopy(model)
    originals = attention_modules(m)
    with one_thread():
        convert(m, tok, calibration=CAL, rank=rank, method="joint", **{**OFF, **kw})
    return m, originals


def _pairs(m, originals, tok) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(A, A')``: the original attention's output before o_proj (the original module run with its
    o_proj swapped for the identity) and the latent attention's, on the converted model's hidden states."""
    got = [{"a": [], "b": []} for _ in originals]
    hooks = []
    for i, (orig, new) in enumerate(zip(originals, attention_modules(m))):
        def pre(_mod, args, kwargs, i=i, orig=orig):
            keep, orig.o_proj = orig.o_proj, nn.Identity()
            try:
                got[i]["a"].append(orig(*args, **kwargs)[0].reshape(-1, keep.in_features).double())
            finally:
                orig.o_proj = keep

        def read(_mod, args, i=i):
            got[i]["b"].append(args[0].reshape(-1, args[0].shape[-1]).double())
        hooks += [new.register_forward_pre_hook(pre, with_kwargs=True), new.o_proj.register_forward_pre_hook(read)]
    with torch.no_grad():
        for text in CAL:
            m(input_ids=tok(text, return_tensors="pt").input_ids, use_cache=False)
    for h in hooks:
        h.remove()
    return [(torch.cat(g["a"]), torch.cat(g["b"])) for g in got]


def test_the_refit_is_the_least_squares_solution(tiny):
    """Without damping, each layer's new o_proj equals the least squares fit of ``W_o A`` from ``A'`` nearest
    ``W_o``, computed independently from the two attentions' outputs, and its reconstruction error is no larger than the original weight's."""
    _, tok = tiny
    m, originals = _converted(tiny)
    w0 = [a.o_proj.weight.detach().clone().double() for a in attention_modules(m)]
    pairs = _pairs(m, originals, tok)
    with one_thread():
        report = correct_outputs(m, originals, tok, CAL, damping=0.0)
    for (a, b), w_old, new, r in zip(pairs, w0, attention_modules(m), report):
        # the solution nearest W_o: W_o plus the minimum-norm least squares change (A' has low rank here)
        ref = w_old + torch.linalg.lstsq(b, (a - b) @ w_old.T, rcond=1e-3, driver="gelsd").solution.T
        w = new.o_proj.weight.detach().double()
        scale = float((a @ w_old.T).abs().max())
        assert torch.allclose(b @ w.T, b @ ref.T, atol=1e-3 * scale)  # the same fit on the calibration inputs
        assert float((w - w_old).norm()) <= 1.01 * float((ref - w_old).norm())  # and no further from W_o
        assert r["after"] <= r["before"] + 1e-9
        assert r["before"] > 1e-4  # rank 4 of 64 changes the attention output: there was something to fix
        direct = float(((a @ w_old.T - b @ new.o_proj.weight.detach().double().T) ** 2).sum() / ((a @ w_old.T) ** 2).sum())
        assert direct == pytest.approx(r["after"], rel=1e-3, abs=1e-6)


def test_the_global_target_is_the_unconverted_models_attention_output(tiny):
    """``target="global"`` fits to the original model's own attention outputs (its hidden states never
    converted): without damping, the fit equals a least squares fit computed from an unconverted copy."""
    model, tok = tiny
    reference = copy.deepcopy(model)
    m, originals = _converted(tiny)
    w0 = [a.o_proj.weight.detach().clone().double() for a in attention_modules(m)]
    latent = [b for _, b in _pairs(m, originals, tok)]
    wanted = [[] for _ in w0]
    hooks = [a.o_proj.register_forward_pre_hook(lambda _m, args, i=i: wanted[i].append(
        args[0].reshape(-1, args[0].shape[-1]).double())) for i, a in enumerate(attention_modules(reference))]
    with torch.no_grad():
        for text in CAL:
            reference(input_ids=tok(text, return_tensors="pt").input_ids, use_cache=False)
    for h in hooks:
        h.remove()
    with one_thread():
        report = correct_outputs(m, originals, tok, CAL, damping=0.0, target="global")
    for b, want, w_old, new, r in zip(latent, wanted, w0, attention_modules(m), report):
        a = torch.cat(want)
        ref = w_old + torch.linalg.lstsq(b, (a - b) @ w_old.T, rcond=1e-3, driver="gelsd").solution.T
        scale = float((a @ w_old.T).abs().max())
        assert torch.allclose(b @ new.o_proj.weight.detach().double().T, b @ ref.T, atol=1e-3 * scale)
        assert r["after"] <= r["before"] + 1e-9
    # the first layer's inputs are the same in both models: there, global and local agree
    local, originals2 = _converted(tiny)
    with one_thread():
        correct_outputs(local, originals2, tok, CAL, damping=0.0, target="local")
    first = attention_modules(local)[0].o_proj.weight
    assert torch.allclose(first, attention_modules(m)[0].o_proj.weight, atol=1e-3 * float(first.abs().max()))


def test_nothing_changes_when_the_latent_loses_nothing(tiny):
    """At full rank the latent attention is the original one: the refit gives back o_proj unchanged."""
    model, _ = tiny
    full = 2 * attention_modules(model)[0].k_proj.out_features
    m, _ = _converted(tiny, rank=full)
    fitted, _ = _converted(tiny, rank=full, output_correction=True)
    for a, b in zip(attention_modules(m), attention_modules(fitted)):
        assert torch.allclose(a.o_proj.weight, b.o_proj.weight, atol=1e-4)


def test_damping_pulls_the_weight_towards_the_original(tiny):
    """A larger damping keeps o_proj nearer the original weight (it shrinks the refit towards W_o)."""
    _, tok = tiny
    dist = []
    for damping in (0.0, 0.1, 10.0):
        m, originals = _converted(tiny)
        w0 = [a.o_proj.weight.detach().clone() for a in attention_modules(m)]
        with one_thread():
            correct_outputs(m, originals, tok, CAL, damping=damping)
        dist.append(sum(float((a.o_proj.weight.detach() - w).norm()) for a, w in zip(attention_modules(m), w0)))
    assert dist[0] > dist[1] > dist[2] > 0


def test_a_corrected_conversion_saves_loads_and_records_it(tiny, tmp_path):
    """convert(output_correction=True) records it, changes o_proj, and a saved copy loads with the same
    logits (o_proj is part of the saved weights)."""
    from kvforge.mla import load_converted, save_converted

    _, tok = tiny
    plain, _ = _converted(tiny)
    m, _ = _converted(tiny, output_correction=True)
    assert m.kvforge_mla.output_correction == "local" and not plain.kvforge_mla.output_correction
    assert m.kvforge_mla.correction_damping == conversion_defaults(2.0)["correction_damping"] == 1.0
    assert not torch.allclose(attention_modules(m)[0].o_proj.weight, attention_modules(plain)[0].o_proj.weight)
    ids = tok(CAL[0], return_tensors="pt").input_ids
    back = load_converted(save_converted(m, None, tmp_path / "conv"))
    with torch.no_grad():
        assert torch.allclose(m(ids).logits, back(ids).logits, atol=1e-5)
    assert back.kvforge_mla.output_correction


def test_bad_correction_options_are_refused_by_name(tiny):
    model, tok = tiny
    m = copy.deepcopy(model)
    with pytest.raises(ValueError, match="output_correction"):
        convert(m, tok, calibration=CAL, rank=4, method="joint", output_correction="everywhere")
    with pytest.raises(ValueError, match="correction_damping"):
        convert(m, tok, calibration=CAL, rank=4, method="joint", output_correction=True, correction_damping=-1)
    with pytest.raises(ValueError, match="output correction"):
        convert(m, tok, rank=4, method="joint", whiten=False, output_correction=True)
    conv, originals = _converted(tiny)
    with pytest.raises(ValueError, match="damping"):
        correct_outputs(conv, originals, tok, CAL, damping=-1.0)
    with pytest.raises(ValueError, match="target"):
        correct_outputs(conv, originals, tok, CAL, target="everywhere")
    with pytest.raises(ValueError, match="original attention modules"):
        correct_outputs(conv, originals[:1], tok, CAL)
    with pytest.raises(ValueError, match="non-empty"):
        correct_outputs(conv, originals, tok, [])


def test_full_rank_conversions_skip_the_weighting_and_correction_passes(tiny):
    """At full rank nothing is truncated, so the defaults run no Fisher, bias-correction or o_proj pass (they
    would change nothing and cost minutes on a real model); at 2x they run all three."""
    model, tok = tiny
    assert conversion_defaults(2.0)["output_aware"] == "fisher" and conversion_defaults(2.0)["output_correction"]
    m = copy.deepcopy(model)
    cfg = convert(m, tok, calibration=CAL, rank=10**6, method="joint")
    assert (cfg.output_aware, cfg.bias_correction, cfg.output_correction) == (False, False, False)
