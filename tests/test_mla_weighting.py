"""kvforge.mla conversion statistics on tiny random models: bias correction (the input's mean restored by a
bias), Fisher weighting (the gradient's second moment at the keys and values), uniform rank allocation,
and the options refused by name."""

from __future__ import annotations

import copy

import pytest
import torch
from kvhelpers import one_thread

from kvforge.mla import calibrate, convert
from kvforge.mla.attention import attention_modules
from kvforge.mla.calibration import fisher

CAL = ["the quick brown fox jumps over the lazy dog, " * 3, "pack my box with five dozen liquor jugs; " * 3]


def _convert(tiny, **kw):
    model, tok = tiny
    m = copy.deepcopy(model)
    with one_thread():
        convert(m, tok, calibration=CAL, **kw)
    return m


def _rebuilt(new) -> tuple[torch.Tensor, torch.Tensor]:
    """The joint layer's effective ``[k; v]`` weight and bias."""
    w = new.up.double() @ new.down.weight.double()
    bias = torch.cat([new.k_bias, new.v_bias]).double() if new.k_bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    return w, bias.double()


def test_bias_correction_restores_the_mean_output_exactly(tiny):
    """With bias correction the converted keys and values of the calibration mean equal the original
    ones (every layer, keys and values); without it the model has no bias to carry it."""
    model, tok = tiny
    with one_thread():
        mean = calibrate(model, tok, CAL)["mean"]
    m = _convert(tiny, rank=4, method="joint", output_aware=False, bias_correction=True)
    for a, new, mu in zip(attention_modules(model), attention_modules(m), mean):
        w0 = torch.cat([a.k_proj.weight, a.v_proj.weight]).double()
        w, b = _rebuilt(new)
        assert torch.allclose(w @ mu + b, w0 @ mu, atol=1e-4)
        assert b.abs().max() > 1e-4  # the low-rank map alone misses the mean
    plain = _convert(tiny, rank=4, method="joint", output_aware=False, bias_correction=False)
    assert attention_modules(plain)[0].k_bias is None


@pytest.mark.parametrize("method", ["joint", "separate"])
def test_bias_correction_lowers_the_error_on_the_calibration_inputs(tiny, method):
    """``E|W x - (W' x + b)|^2`` over the calibration inputs (from their mean and second moment) is no larger
    with bias correction than without, for every layer: the covariance leaves the mean to the bias."""
    model, tok = tiny
    with one_thread():
        st = calibrate(model, tok, CAL)
    conv = {bc: _convert(tiny, rank=3, method=method, output_aware=False, bias_correction=bc) for bc in (True, False)}

    def err(a, new, cov, mu):
        w0 = torch.cat([a.k_proj.weight, a.v_proj.weight]).double()
        if method == "joint":
            w, b = _rebuilt(new)
        else:
            w = torch.block_diag(new.up_k.double(), new.up_v.double()) @ torch.cat(
                [new.down_k.weight, new.down_v.weight]).double()
            b = torch.cat([new.k_bias, new.v_bias]).double() if new.k_bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        d = w0 - w
        return float(torch.trace(d @ cov @ d.T) - 2 * b @ d @ mu + b @ b)

    for i, a in enumerate(attention_modules(model)):
        with_bc = err(a, attention_modules(conv[True])[i], st["cov"][i], st["mean"][i])
        without = err(a, attention_modules(conv[False])[i], st["cov"][i], st["mean"][i])
        assert with_bc <= without * (1 + 1e-6)


def test_fisher_is_the_second_moment_of_the_sampled_label_gradient(tiny):
    """:func:`fisher` equals ``mean_t g_t g_t^T`` of the gradient at k_proj's and v_proj's outputs, computed
    here independently with ``torch.autograd.grad``; the same seed gives the same matrices, and no
    parameter is left with a gradient or a changed ``requires_grad``."""
    model, tok = tiny
    flags = [p.requires_grad for p in model.parameters()]  # other tests may have frozen the shared model
    with one_thread():
        got = fisher(model, tok, CAL[:1], samples=1, seed=3)
        with torch.inference_mode():  # a caller's inference mode does not stop the backward passes
            again = fisher(model, tok, CAL[:1], samples=1, seed=3)
        ids = tok(CAL[0], return_tensors="pt").input_ids
        outs = {}
        hooks = [a.k_proj.register_forward_hook(lambda _m, _a, o, i=i: outs.__setitem__((i, "k"), o))
                 for i, a in enumerate(attention_modules(model))]
        hooks += [a.v_proj.register_forward_hook(lambda _m, _a, o, i=i: outs.__setitem__((i, "v"), o))
                  for i, a in enumerate(attention_modules(model))]
        hooks.append(model.model.embed_tokens.register_forward_hook(lambda _m, _a, o: o.requires_grad_(True)))
        try:
            logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].float(), -1)
        finally:
            for h in hooks:
                h.remove()
        y = torch.multinomial(logp.detach().exp(), 1, generator=torch.Generator().manual_seed(3))
        keys = sorted(outs)
        grads = torch.autograd.grad(-logp.gather(1, y).sum(), [outs[k] for k in keys])
        by = dict(zip(keys, grads))
    for i, g in enumerate(got):
        v = torch.cat([by[(i, "k")][0], by[(i, "v")][0]], -1).double()
        assert torch.allclose(g, v.T @ v / ids.shape[1], rtol=1e-4, atol=1e-10)
        assert torch.equal(g, again[i])
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("damping", [0.0, 0.5])
def test_fisher_weighted_factors_minimise_the_fisher_norm(tiny, damping):
    """The Fisher-weighted rank-r factors fit the layer's weight best in ``|L dW C^(1/2)|`` with
    ``L = (G + damping P P^T)^(1/2)`` (no worse than plain whitening there; Eckart-Young in the weighted
    norm) and keep the up-projection orthonormal."""
    from kvforge.mla.convert import _fisher_weights, _left_weights

    model, tok = tiny
    with one_thread():
        st = calibrate(model, tok, CAL)
        grads = fisher(model, tok, CAL)
    a0 = attention_modules(model)[0]
    w0 = torch.cat([a0.k_proj.weight, a0.v_proj.weight]).double()
    prior = _left_weights(a0, st, 0, "joint", None, 1.0)
    left = _fisher_weights(a0, grads[0], "joint", None, prior, damping)["kv"]
    chol = torch.linalg.cholesky(st["cov"][0] + 1e-6 * torch.eye(w0.shape[1], dtype=torch.float64))
    rank = w0.shape[0] // 2
    errs = {}
    for aware in ("fisher", False):
        new = attention_modules(_convert(tiny, rank=rank, method="joint", output_aware=aware,
                                         fisher_damping=damping, bias_correction=False))[0]
        errs[aware] = (left @ (new.up.double() @ new.down.weight.double() - w0) @ chol).norm().item()
        up = new.up.double()
        assert torch.allclose(up.T @ up, torch.eye(rank, dtype=torch.float64), atol=1e-5)
    assert errs["fisher"] < errs[False] * 0.99


def test_uniform_allocation_gives_every_layer_the_same_width(tiny):
    model, _ = tiny
    m = _convert(tiny, ratio=2.0, method="joint", allocation="uniform")
    widths = {a.cache_dims() for a in attention_modules(m)}
    kv = model.config.num_key_value_heads * model.config.head_dim
    assert widths == {kv}  # 2x of keys and values together: one latent as wide as the keys
    cfg = m.kvforge_mla
    assert (cfg.output_aware, cfg.bias_correction, cfg.allocation, cfg.fisher_damping, cfg.refine) == (
        "fisher", True, "uniform", 0.5, 0)  # the 2x defaults
    far = _convert(tiny, ratio=4.0, method="joint")
    assert (far.kvforge_mla.output_aware, far.kvforge_mla.bias_correction, far.kvforge_mla.refine) == (False, False, 0)


def test_weighting_options_are_refused_by_name(tiny):
    model, tok = tiny
    m = copy.deepcopy(model)
    with pytest.raises(ValueError, match="output_aware must be"):
        convert(m, tok, ratio=2, calibration=CAL, output_aware="kl")
    with pytest.raises(ValueError, match="unknown rank allocation 'even'"):
        convert(m, tok, ratio=2, calibration=CAL, allocation="even")
    with pytest.raises(ValueError, match="bias correction need calibration"):
        convert(m, tok, ratio=2, whiten=False, bias_correction=True)
    with pytest.raises(ValueError, match="fisher_damping must be >= 0"):
        convert(m, tok, ratio=2, calibration=CAL, fisher_damping=-1)
    with pytest.raises(ValueError, match="fisher_samples must be >= 1"):
        convert(m, tok, ratio=2, calibration=CAL, output_aware="fisher", fisher_samples=0)
    assert getattr(m, "kvforge_mla", None) is None  # nothing was converted by a refused call


def test_refine_factors_each_layer_on_the_inputs_the_converted_model_gives_it(tiny):
    """``refine=1`` reads the statistics again on the once-converted model: the refined layers restore the
    mean of those inputs exactly (bias correction on the new statistics), layer 0's input (before any
    converted layer) reads as before, and the ranks do not change."""
    model, tok = tiny
    once = _convert(tiny, rank=4, method="joint", output_aware=False, bias_correction=True, refine=0)
    twice = _convert(tiny, rank=4, method="joint", output_aware=False, bias_correction=True, refine=1)
    with one_thread():
        st0, st1 = calibrate(model, tok, CAL), calibrate(once, tok, CAL)
    assert torch.allclose(st1["cov"][0], st0["cov"][0]) and not torch.allclose(st1["mean"][-1], st0["mean"][-1])
    for a, new, mu in zip(attention_modules(model), attention_modules(twice), st1["mean"]):
        w, b = _rebuilt(new)
        assert torch.allclose(w @ mu + b, torch.cat([a.k_proj.weight, a.v_proj.weight]).double() @ mu, atol=1e-4)
    assert twice.kvforge_mla.ranks == once.kvforge_mla.ranks and twice.kvforge_mla.refine == 1
    m = copy.deepcopy(model)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="refine must be an int"):
            convert(m, tok, ratio=2, calibration=CAL, refine=bad)
