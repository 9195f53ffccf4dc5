"""Fitting a translator in closed form: ridge regression per target layer, both models frozen."""

from __future__ import annotations

import torch

from .align import align
from .features import source_window, token_features, token_local
from .layers import layer_map
from .translator import Translator, TranslatorConfig, _model_shape, token_dim, unrotated

PCA_TEXTS = 8  # calibration texts whose features fit the principal components before the ridge pass
FIT_FACT_SEED = 5  # fact passages of the default calibration (training and validation use other seeds)


def calibration_texts(pieces: int = 96, piece_chars: int = 1400, facts: int | None = None) -> list[str]:
    """The default calibration texts of a fit: ``pieces`` pieces of the calibration split and ``facts`` (default:
    as many) passages with planted facts, each with its questions and answers (``.facts``)."""
    from ..texts import load_text, text_pieces
    from .facts import fact_passages

    texts = text_pieces(load_text("pydoc", "calibration"), pieces, piece_chars)
    n = pieces if facts is None else facts
    return texts + ([f.context + f.continuation for f in fact_passages(n, seed=FIT_FACT_SEED)] if n else [])


@torch.no_grad()
def fit(source_model, target_model, source_tokenizer, target_tokenizer, texts: list[str], strategy: str = "nearest",
        k: int = 3, ridge: float = 1e-2, source_name: str = "", target_name: str = "",
        sliding_sources: bool = False, window: int = 3, window_rank: int = 32, neighbours: int = 1,
        token_rank: int = 192, show_progress: bool = True) -> Translator:
    """Closed-form ridge fit of every target layer's map on ``texts`` (both models frozen).

    A token-conditioned translator (``token_rank > 0``, the default) also reads a ``window`` of source tokens
    (older slots reduced to ``window_rank`` principal components per source layer) and the target's token-local
    features of the token and its ``neighbours`` previous tokens (reduced to ``token_rank`` components); its
    layer 0 is the target's own (exact) and the layer-0 map becomes the trust probe. ``token_rank=0, window=1``
    fits the source-only maps of format 1.

    ``sliding_sources``: let the source's sliding-window layers feed the map too; such a translator only
    translates contexts that fit in the source's window (a longer one raises ``KVStateError``).

    Raises ``ValueError`` for an empty ``texts`` or a window/rank below its minimum.
    """
    from ..models import fingerprint, layer_types, text_config
    from ..progress import progress
    from .evaluate import prefill_state

    if not texts:
        raise ValueError("fit needs at least one calibration text")
    if window < 1 or window_rank < 0 or neighbours < 0 or token_rank < 0:
        raise ValueError(f"window >= 1 and ranks, neighbours >= 0 needed; got window={window}, "
                         f"window_rank={window_rank}, neighbours={neighbours}, token_rank={token_rank}")
    s_shape, t_shape = _model_shape(source_model), _model_shape(target_model)
    # a sliding-window source layer forgets tokens older than its window, so by default only the source's
    # full-attention layers feed the map: then any context length translates
    usable = [i for i, t in enumerate(layer_types(source_model)) if sliding_sources or t != "sliding_attention"]
    layers = [[usable[j] for j in js] for js in layer_map(len(usable), t_shape[0], strategy, k)]
    hidden = text_config(target_model).hidden_size
    cfg = TranslatorConfig(source_name, target_name, fingerprint(source_model), fingerprint(target_model), s_shape,
                           t_shape, layers, strategy, k, ridge, sliding_sources=sliding_sources, window=window,
                           window_rank=min(window_rank, 2 * s_shape[1] * s_shape[2]) if window > 1 else 0,
                           neighbours=neighbours, extra={"target_hidden": hidden})
    cfg.token_rank = min(token_rank, token_dim(cfg))  # no more components than features
    tr = Translator(cfg)
    used = sorted({j for ls in layers for j in ls})
    if cfg.window_rank or cfg.token_conditioned:  # principal components from the first texts
        slots: dict[int, list] = {j: [] for j in used}
        toks = []
        for text in texts[:PCA_TEXTS]:
            a = align(text, source_tokenizer, target_tokenizer)
            if cfg.window_rank:
                src = unrotated(prefill_state(source_model, a.source_ids), source_model, used)
                for j, w in source_window(src, a.index, window).items():
                    slots[j].append(w[a.index >= 0].reshape(-1, w.shape[-1]))
            if cfg.token_conditioned:
                toks.append(token_features(*token_local(target_model, a.target_ids), neighbours))
        if cfg.window_rank:
            for j in used:
                tr.window_pca[str(j)].fit(torch.cat(slots[j]))
        if cfg.token_conditioned:
            tr.token_pca.fit(torch.cat(toks))
        del slots, toks
    xtx = [None] * t_shape[0]
    xty = [None] * t_shape[0]
    tokens = 0
    for text in progress(texts, desc="fit translator", disable=not show_progress):
        s_ids = source_tokenizer(text, return_tensors="pt").input_ids[0]
        s_state = prefill_state(source_model, s_ids)
        inputs = tr.prepare(s_state, text, source_model, target_model, source_tokenizer, target_tokenizer)
        a = inputs.a
        t_state = prefill_state(target_model, a.target_ids)
        tgt = unrotated(t_state, target_model)
        keep = a.index >= 0
        keep[0] = False  # position 0 is the target's attention sink: it is never translated (see translate)
        n_t = len(a.target_ids)
        for i in range(t_shape[0]):
            x = tr.features(inputs, i)[keep]
            x = torch.cat([x, torch.ones(len(x), 1)], 1).double()
            tk, tv = tgt[i]
            held = tk.shape[2]  # a sliding target layer holds only its last tokens
            rows = torch.arange(n_t)[keep]
            sel = rows >= n_t - held
            y = torch.cat([tk[0].permute(1, 0, 2).reshape(held, -1), tv[0].permute(1, 0, 2).reshape(held, -1)], 1)
            y = y[rows[sel] - (n_t - held)].double()
            x = x[sel]
            xtx[i] = x.T @ x if xtx[i] is None else xtx[i] + x.T @ x
            xty[i] = x.T @ y if xty[i] is None else xty[i] + x.T @ y
            if a.index[0] < 0 and held == n_t:  # the target's own first special token, e.g. <bos>
                tr.bos_k[i], tr.bos_v[i] = tk[0][:, 0], tv[0][:, 0]
        tokens += int(keep.sum())
    for i, lin in enumerate(tr.maps):
        a_ = xtx[i]
        f = a_.shape[0] - 1
        reg = ridge * torch.trace(a_[:f, :f]) / f
        w = torch.linalg.solve(a_ + reg * torch.diag(torch.cat([torch.ones(f), torch.zeros(1)]).double()), xty[i])
        lin.weight.copy_(w[:f].T.float())
        lin.bias.copy_(w[f].float())
    tr.config.tokens_fitted = tokens
    return tr
