"""Selective recomputation: the target re-reads some of a translated context's tokens and writes its own
keys and values over the translated ones (CacheBlend's repair of a reused cache, Yao et al. 2024, applied
to a translated one).

The chosen tokens go through the target in one forward pass at their own positions. Each attends to the
translated cache of the *other* tokens before it and to the recomputed chosen tokens up to itself, so
every layer's new keys and values are computed from the repaired layer below. With every token chosen
this is exactly the target's own prefill; with a share ``f`` of them it costs about ``f`` of a prefill.

    idx = choose(alignment.index, 0.1, "trust", tr.trust_scores(inputs))
    repaired = recompute(target_model, translated_state, idx)
"""

from __future__ import annotations

import re

import torch

from .. import run
from ..state import KVState, KVStateError, LayerState

SELECT = ("trust", "sentence", "last")
_SENTENCE_END = re.compile(r"[.!?](?=\s)\n*|\n+")  # line breaks after an end belong to its sentence


def sentence_ids(tokenizer, text: str) -> torch.Tensor:
    """``[n]`` the sentence each of ``text``'s tokens (as ``tokenizer`` reads the whole text, specials included)
    starts in, counting from 0; -1 for special tokens. A sentence ends at ".", "!" or "?" before white space, or
    at a line break (so "Question: ..." and "Answer: ..." lines are sentences of their own)."""
    from .align import _encode

    _, offsets = _encode(tokenizer, text)
    ends = torch.tensor([m.end() for m in _SENTENCE_END.finditer(text)], dtype=torch.long)
    starts = torch.tensor([b if e > b else -1 for b, e in offsets], dtype=torch.long)
    ids = torch.searchsorted(ends, starts, right=True)
    return torch.where(starts < 0, -1, ids)


def by_sentence(scores: torch.Tensor, sentences: torch.Tensor) -> torch.Tensor:
    """``[n]`` scores that order tokens by their sentence's mean score first (over its finite scores), then by
    their own: top-k of them takes whole sentences, the highest-scoring first, and the best tokens of the last
    one in part. Tokens outside any sentence (``sentences`` -1) rank lowest."""
    out = torch.full_like(scores, float("-inf"), dtype=torch.float)
    labels = sentences[sentences >= 0].unique()
    means = torch.stack([scores[(sentences == s) & torch.isfinite(scores)].float().mean().nan_to_num(float("-inf"))
                         for s in labels]) if len(labels) else torch.zeros(0)
    order = torch.empty(len(labels), dtype=torch.float)
    order[means.argsort(stable=True)] = torch.arange(len(labels), dtype=torch.float)
    for s, o in zip(labels.tolist(), order.tolist()):
        members = torch.nonzero(sentences == s).flatten()
        within = torch.empty(len(members))
        within[scores[members].argsort(stable=True)] = torch.arange(len(members), dtype=torch.float)
        out[members] = o + within / len(members)  # in [o, o + 1): the sentence's rank, then the token's
    return out


def choose(index: torch.Tensor, fraction: float, select: str = "trust",
           scores: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
    """Sorted positions ``[m]`` of the tokens to recompute: ``round(fraction * n)`` of the ``n`` translated tokens
    (``index >= 0``; special tokens are the target's own already). ``trust``: the highest ``scores`` (see
    :meth:`Translator.trust_scores`); ``sentence``: the same, given :func:`by_sentence` scores (whole sentences,
    the least trusted on average first); ``last``: the last tokens. ``fraction`` 1 takes every token, specials
    included (the target's own prefill). Positions before ``start`` (an own prefix) are never chosen; the
    share still counts every translated token."""
    if select not in SELECT:
        raise ValueError(f"unknown recompute selection {select!r}; choose from {', '.join(SELECT)}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"recompute is a share of the tokens, 0 to 1; got {fraction}")
    n_all = len(index)
    if fraction >= 1.0:
        return torch.arange(start, n_all)
    candidates = torch.nonzero(index >= 0).flatten()
    m = round(fraction * len(candidates))
    candidates = candidates[candidates >= start]
    m = min(m, len(candidates))
    if m == 0:
        return torch.zeros(0, dtype=torch.long)
    if select == "last":
        return candidates[-m:]
    if scores is None:
        raise ValueError(f"recompute selection {select!r} needs scores (the translator's trust scores)")
    s = scores[candidates]
    keep = candidates[torch.topk(s, m).indices]
    return keep.sort().values


def splice_prefix(state: KVState, prefix: KVState) -> KVState:
    """``state`` with its first ``prefix.num_tokens`` tokens' keys and values taken from ``prefix``: the target's
    own cached state of the text's opening (a shared instruction or few-shot block, as prefix caching keeps
    it). Exact for those tokens, since a prefix attends to nothing after it.

    Raises :class:`~kvforge.state.KVStateError` for a prefix of another model, one whose tokens differ from
    the state's first tokens, or one whose layers do not hold every prefix token (a sliding layer's window)."""
    if prefix.fingerprint != state.fingerprint:
        raise KVStateError(f"the own prefix is a state of another model ({prefix.model_name or 'unnamed'}) than the "
                           f"translation's ({state.model_name or 'unnamed'})")
    p = prefix.num_tokens
    if p > state.num_tokens or not torch.equal(prefix.token_ids[0], state.token_ids[0, :p]):
        first = next((i for i in range(min(p, state.num_tokens))
                      if prefix.token_ids[0, i] != state.token_ids[0, i]), min(p, state.num_tokens))
        raise KVStateError(f"the own prefix's {p} tokens are not the first tokens of the translated text (they differ "
                           f"at token {first}); cache the prefix as the target tokenizes the whole text "
                           "(kvforge.translate.align.prefix_tokens)")
    if any(layer.length != p for layer in prefix.layers) or len(prefix.layers) != len(state.layers):
        raise KVStateError("the own prefix must hold every one of its tokens in every layer (a sliding layer here "
                           "holds fewer)")
    layers = []
    for la, own in zip(state.layers, prefix.layers):
        k, v = la.keys.clone(), la.values.clone()
        own = own.to_dense()
        k[:, :, :p], v[:, :, :p] = own.keys.to(k), own.values.to(v)
        layers.append(LayerState.dense(k, v))
    return KVState(layers, state.token_ids, state.positions, list(state.layer_types), state.fingerprint,
                   model_name=state.model_name, sliding_window=state.sliding_window,
                   layer_indices=list(state.layer_indices), num_model_layers=state.num_model_layers,
                   meta={**state.meta, "own_prefix_tokens": p})


def own_prefix_state(model, tokenizer, text: str, chars: int) -> KVState | None:
    """The model's own state of ``text``'s opening: the tokens of the whole text that lie within its first
    ``chars`` characters (:func:`~kvforge.translate.align.prefix_tokens`), prefilled; ``None`` when none do.
    In a server this is a prefix-cache hit. Raises ``ValueError`` for ``chars`` outside ``0..len(text)``."""
    from ..generate import prefill
    from .align import prefix_tokens

    n = prefix_tokens(tokenizer, text, chars)
    if n == 0:
        return None
    return prefill(model, None, tokenizer(text, return_tensors="pt").input_ids[0][:n])


def _mask(q_pos: torch.Tensor, k_pos: torch.Tensor, allow_cache: torch.Tensor, window: int | None,
          dtype: torch.dtype) -> torch.Tensor:
    """Additive ``[1, 1, m, n + m]`` mask: a recomputed token at ``q_pos`` sees the cached tokens in
    ``allow_cache`` before it and the recomputed tokens up to itself, within ``window`` when given."""
    n = len(k_pos) - len(q_pos)
    allow = torch.cat([allow_cache[None, :] & (k_pos[None, :n] < q_pos[:, None]),
                       k_pos[None, n:] <= q_pos[:, None]], 1)
    if window:
        allow &= (q_pos[:, None] - k_pos[None, :]) < window
    out = torch.zeros(allow.shape, dtype=dtype)
    return out.masked_fill(~allow, torch.finfo(dtype).min)[None, None]


def recompute(model, state: KVState, index: torch.Tensor, grad: bool = False) -> KVState:
    """``state`` with the tokens at ``index`` (sorted positions into it) recomputed by ``model``, which attends
    to ``state``'s other tokens. Every layer of ``state`` must hold all its tokens (a translated state does).
    ``grad``: keep the graph from ``state``'s tensors to the result (training a translator through the
    re-read, :mod:`.train`); by default it runs in inference mode.

    Raises :class:`~kvforge.state.KVStateError` for a state of another model or with fewer tokens in a layer."""
    with torch.inference_mode(not grad):
        return _recompute(model, state, index)


def _recompute(model, state: KVState, index: torch.Tensor) -> KVState:
    state.check_model(model)
    n = state.num_tokens
    if any(layer.length != n for layer in state.layers):
        raise KVStateError("recomputation needs every layer to hold all the state's tokens (a sliding layer here "
                           "holds fewer)")
    index = torch.as_tensor(index, dtype=torch.long).flatten()
    if len(index) == 0:
        return state
    if (index.diff() <= 0).any() or index[0] < 0 or index[-1] >= n:
        raise ValueError(f"recompute positions must be sorted, distinct and within 0..{n - 1}")
    from transformers import DynamicCache

    device = run.model_device(model)
    dtype = next(model.parameters()).dtype
    cache = DynamicCache()
    for i, layer in enumerate(state.layers):
        d = layer.to_dense()
        cache.update(d.tensors["keys"].to(device, dtype), d.tensors["values"].to(device, dtype), i)
    pos = state.positions[index]
    k_pos = torch.cat([state.positions, pos])
    allow = torch.ones(n, dtype=torch.bool)
    allow[index] = False  # the translated entries of recomputed tokens are replaced, never read
    full = _mask(pos, k_pos, allow, None, dtype).to(device)
    if "sliding_attention" in state.layer_types:
        mask = {"full_attention": full,
                "sliding_attention": _mask(pos, k_pos, allow, state.sliding_window, dtype).to(device)}
    else:
        mask = full
    ids = state.token_ids[:, index].to(device)
    decoder = getattr(model, "model", model)  # the decoder alone: no output projection (no logits needed)
    decoder(input_ids=ids, **run.cache_kw(cache), use_cache=True, position_ids=pos[None].to(device),
            attention_mask=mask)
    layers = []
    for i, old in enumerate(state.layers):
        k, v = cache.layers[i].keys, cache.layers[i].values
        nk, nv = k[:, :, :n].clone(), v[:, :, :n].clone()
        nk[:, :, index.to(device)] = k[:, :, n:]
        nv[:, :, index.to(device)] = v[:, :, n:]
        layers.append(LayerState.dense(nk.to(old.keys.dtype), nv.to(old.keys.dtype)))
    return KVState(layers, state.token_ids, state.positions, list(state.layer_types), state.fingerprint,
                   model_name=state.model_name, sliding_window=state.sliding_window,
                   layer_indices=list(state.layer_indices), num_model_layers=state.num_model_layers,
                   meta={**state.meta, "recomputed_tokens": len(index)})
