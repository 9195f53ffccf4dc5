"""Calibration statistics for :func:`kvforge.mla.convert`: what the attention layers see on calibration text.

:func:`calibrate` runs the model over calibration texts with hooks on every attention module and collects,
per layer, the covariance of the input of ``k_proj``/``v_proj`` (which whitens the factorisation), the
mean squared queries (which weigh key errors in the output-aware mode) and, for methods that keep rotary
pairs (``decoupled_rope``), how much each rotary frequency pair contributes to the scores and
:func:`rotation_loss`: how much a pair's rotation matters at all (slow pairs barely rotate over a context).
:func:`fisher` collects what the Fisher-weighted conversion needs: per layer, the second moment of the
loss gradient at the outputs of ``k_proj`` and ``v_proj`` (the output side of a Kronecker-factored
Fisher, as K-FAC (Martens & Grosse 2015) and Fisher-weighted SVD (Hsu et al. 2022) use it).
"""

from __future__ import annotations

import torch

from ..models import inner_module
from ..rope import cos_sin
from .attention import attention_modules


@torch.no_grad()
def calibrate(model, tokenizer, texts: list[str], max_tokens: int = 512, rope_stats: bool = False) -> dict:
    """Per layer: ``cov`` (second moment of the input of k_proj/v_proj, float64 ``[hidden, hidden]``; also of
    a converted model's latent attention, whose down-projections read the same input), ``mean``
    (its mean ``[hidden]``), ``q2`` (mean squared queries) and, with ``rope_stats``,
    ``pair_score [H, D/2]``: mean ``|q_f| |k_f|`` per rotary frequency pair of each KV head (summed over its
    query heads), the post-norm queries and keys the model attends with, and ``rotation_loss [D/2]``."""
    attns = attention_modules(model)
    stats = [{"cov": None, "n": 0, "pair": None, "q2": None} for _ in attns]
    hooks = []

    def q_out(i, width):
        def hook(_mod, _args, out):
            x = out.reshape(-1, width).double()
            s = stats[i]
            s["q2"] = (x * x).sum(0) if s["q2"] is None else s["q2"] + (x * x).sum(0)
        return hook

    def k_in(i):  # on the attention module: its hidden states are what k_proj (or a latent down-projection) reads
        def hook(_mod, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            x = x.reshape(-1, x.shape[-1]).double()
            s = stats[i]
            s["cov"] = x.T @ x if s["cov"] is None else s["cov"] + x.T @ x
            s["sum"] = x.sum(0) if s.get("sum") is None else s["sum"] + x.sum(0)
            s["n"] += x.shape[0]
        return hook

    captured: dict[int, dict[str, torch.Tensor]] = {}

    def grab(i, name):
        def hook(_mod, _args, out):
            captured.setdefault(i, {})[name] = out.detach()
        return hook

    for i, a in enumerate(attns):
        hooks.append(a.register_forward_pre_hook(k_in(i), with_kwargs=True))
        # the queries the model attends with (after q_norm, before RoPE): output-aware key weights
        q_mod = a.q_norm if getattr(a, "q_norm", None) is not None else a.q_proj
        hooks.append(q_mod.register_forward_hook(q_out(i, a.q_proj.out_features)))
        if rope_stats:
            hooks.append((a.q_norm if getattr(a, "q_norm", None) is not None else a.q_proj).register_forward_hook(
                grab(i, "q")))
            hooks.append((a.k_norm if getattr(a, "k_norm", None) is not None else a.k_proj).register_forward_hook(
                grab(i, "k")))
    device = next(model.parameters()).device
    tokens = 0
    try:
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens].to(device)
            captured.clear()
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            tokens += ids.shape[1]
            if rope_stats:
                for i, a in enumerate(attns):
                    d = a.head_dim
                    q = captured[i]["q"].reshape(-1, a.q_proj.out_features // d, d).float()
                    k = captured[i]["k"].reshape(-1, a.k_proj.out_features // d, d).float()
                    half = d // 2
                    qn = (q[..., :half] ** 2 + q[..., half:] ** 2).sqrt()  # [T, Hq, D/2]
                    kn = (k[..., :half] ** 2 + k[..., half:] ** 2).sqrt()  # [T, H, D/2]
                    g = qn.shape[1] // kn.shape[1]
                    score = (qn.mean(0).view(kn.shape[1], g, half).sum(1)) * kn.mean(0)  # [H, D/2]
                    stats[i]["pair"] = score if stats[i]["pair"] is None else stats[i]["pair"] + score
    finally:
        for h in hooks:
            h.remove()
    if tokens == 0:
        raise ValueError("calibration needs at least one non-empty text")
    out = {"cov": [s["cov"] / s["n"] for s in stats], "mean": [s["sum"] / s["n"] for s in stats],
           "q2": [s["q2"] / s["n"] for s in stats], "tokens": tokens}
    if rope_stats:
        out["pair_score"] = [s["pair"] / len(texts) for s in stats]
        out["rotation_loss"] = [rotation_loss(model, i) for i in range(len(attns))]
    return out


def fisher(model, tokenizer, texts: list[str], max_tokens: int = 512, samples: int = 2,
           seed: int = 0) -> list[torch.Tensor]:
    """Per layer, ``E[g g^T]`` (float64 ``[Dk + Dv, Dk + Dv]``): ``g`` the gradient of the model's log-likelihood
    at one token's ``k_proj`` output over its ``v_proj`` output, averaged over the calibration tokens.

    The labels are sampled from the model's own next-token distribution (``samples`` per position, from a
    generator seeded with ``seed``, so a conversion is repeatable), which makes this the true Fisher rather
    than the empirical one (the gradient at the text's own next tokens, which measured worse). A weight
    error ``dW`` of the layer then costs about ``tr(dW^T G dW C)`` in KL (``C`` the input's second
    moment, :func:`calibrate`). One backward pass per sample; no parameter gradient is kept.
    Raises ``ValueError`` for no calibration tokens or ``samples < 1``."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    with torch.inference_mode(False), torch.enable_grad():  # also when the caller is in inference mode
        return _fisher(model, tokenizer, texts, max_tokens, samples, seed)


def _fisher(model, tokenizer, texts, max_tokens, samples, seed) -> list[torch.Tensor]:
    attns = attention_modules(model)
    dims = [a.k_proj.out_features + a.v_proj.out_features for a in attns]
    acc = [torch.zeros(n, n, dtype=torch.float64) for n in dims]
    outs: dict[tuple[int, str], torch.Tensor] = {}

    def keep(i, name):
        def hook(_mod, _args, out):
            out.retain_grad()
            outs[(i, name)] = out
        return hook

    hooks = [inner_module(model, "embed_tokens").register_forward_hook(lambda _m, _a, out: out.requires_grad_(True))]
    for i, a in enumerate(attns):
        hooks += [a.k_proj.register_forward_hook(keep(i, "k")), a.v_proj.register_forward_hook(keep(i, "v"))]
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    tokens = 0
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens].to(device)
            if ids.shape[1] < 2:
                continue
            outs.clear()
            logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].float(), -1)
            probs = logp.detach().exp()
            for k in range(samples):
                y = torch.multinomial(probs, 1, generator=gen)
                (-logp.gather(1, y).sum()).backward(retain_graph=k < samples - 1)
                for i in range(len(attns)):
                    g = torch.cat([outs[(i, "k")].grad[0], outs[(i, "v")].grad[0]], -1).double().cpu()
                    acc[i] += g.T @ g / samples
                    outs[(i, "k")].grad = outs[(i, "v")].grad = None
            tokens += ids.shape[1]
    finally:
        for h in hooks:
            h.remove()
        for p, req in frozen:
            p.requires_grad_(req)
        outs.clear()
    if tokens == 0:
        raise ValueError("the Fisher weighting needs at least one calibration text of two or more tokens")
    return [g / tokens for g in acc]


def rotation_loss(model, layer: int, span: int = 2048) -> torch.Tensor:
    """``1 - mean cos(theta_f * delta)`` over distances ``0..span`` per frequency pair ``[D/2]``: how much a
    pair's rotation changes scores; near 0 for slow pairs, whose rotation can be dropped."""
    attn = attention_modules(model)[layer]
    kind = getattr(attn, "layer_type", None)
    cos, _ = cos_sin(model, torch.arange(span), kind)
    half = cos.shape[1] // 2
    return 1 - cos[:, :half].mean(0)
