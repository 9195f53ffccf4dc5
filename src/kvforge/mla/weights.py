"""The weights :func:`kvforge.mla.convert` factors with: whitening by the input's statistics, and the
output-aware left weights (query energy and ``o_proj``, or the Fisher matrix of the keys and values),
so that a rank-r truncation of ``L W C^(1/2)`` is the best rank-r fit in the weighted norm."""

from __future__ import annotations

import torch

from .methods import get_method


def _whitener(cov: torch.Tensor) -> torch.Tensor:
    """``L`` with ``cov + jitter I = L L^T`` (float64; jitter 1e-6 of the mean variance keeps it definite)."""
    c = cov.double()
    jitter = 1e-6 * torch.trace(c) / c.shape[0]
    return torch.linalg.cholesky(c + jitter * torch.eye(c.shape[0], dtype=c.dtype, device=c.device))


def whitened_basis(weight: torch.Tensor, cov: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors ``U [out, out']`` and singular values of ``W L`` (``cov = L L^T``); plain SVD of
    ``W`` without ``cov``."""
    w = weight.double()
    if cov is not None:
        w = w @ _whitener(cov)
    u, s, _ = torch.linalg.svd(w, full_matrices=False)
    return u, s


def output_weights(attn, q2: torch.Tensor, key_rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left weights that measure key and value errors by what they do to the layer's output.

    A key error ``dk`` of KV head ``j`` changes the scores of its query heads by ``q . dk``; with the
    rotation averaged over positions, its cost is ``sum_i E[q_i^2] dk_i^2`` (``q2`` pair-averaged, times the
    k_norm gain where the model has one). A value error ``dv`` reaches the residual stream through the
    group's slices of ``o_proj``: cost ``|| W_o^j dv ||^2``, weighted by ``(sum_h W_o^hT W_o^h)^(1/2)``.
    Returns the key weights for ``key_rows`` (per KV head, the head dims kept in the key matrix) and the
    block-diagonal value weight ``[H*d, H*d]``.
    """
    from .methods import _norm_gain

    d = attn.head_dim
    hq = attn.q_proj.out_features // d
    h = attn.k_proj.out_features // d
    g = hq // h
    q = q2.double().view(hq, d)
    q = (q[:, : d // 2] + q[:, d // 2:]) / 2  # RoPE mixes each (i, i + d/2) pair
    q = torch.cat([q, q], 1).view(h, g, d).sum(1)  # [H, d]
    if getattr(attn, "k_norm", None) is not None:
        q = q * _norm_gain(attn.k_norm, d, torch.float64).to(q.device) ** 2
    lk = torch.cat([q[j, rows].sqrt() for j, rows in enumerate(key_rows)])
    wo = attn.o_proj.weight.double()
    blocks = []
    for j in range(h):
        m = sum(wo[:, i * d:(i + 1) * d].T @ wo[:, i * d:(i + 1) * d] for i in range(j * g, (j + 1) * g))
        ev, vec = torch.linalg.eigh(m)
        blocks.append(vec @ torch.diag(ev.clamp_min(ev.max() * 1e-6).sqrt()) @ vec.T)
    return (lk.clamp_min(lk.max() * 1e-6) if lk.numel() else lk), torch.block_diag(*blocks)


def _sqrtm(m: torch.Tensor, floor: float = 1e-4) -> torch.Tensor:
    """Symmetric square root of a PSD matrix, eigenvalues floored at ``floor`` times the largest (invertible)."""
    ev, vec = torch.linalg.eigh(m)
    ev = ev.clamp_min(float(ev.max()) * floor if float(ev.max()) > 0 else 1.0)
    return vec @ torch.diag(ev.sqrt()) @ vec.T


def _fisher_weights(attn, g: torch.Tensor, method: str, rest: list[list[int]] | None,
                    prior: dict[str, torch.Tensor] | None = None, damping: float = 0.0) -> dict[str, torch.Tensor]:
    """``(G + damping P P^T)^(1/2)`` restricted to the rows each latent of ``method`` rebuilds (``g`` over
    k_proj's then v_proj's outputs, :func:`kvforge.mla.calibration.fisher`; ``prior``: the query/o_proj
    weights of :func:`_left_weights`; both terms scaled to unit trace first)."""
    d, nk = attn.head_dim, attn.k_proj.out_features
    rows = rest if rest is not None else [list(range(d))] * (nk // d)
    k_idx = torch.tensor([j * d + r for j, rr in enumerate(rows) for r in rr], dtype=torch.long)
    v_idx = torch.arange(nk, g.shape[0])
    idx = {"k": k_idx, "v": v_idx, "kv": torch.cat([k_idx, v_idx])}
    out = {}
    for k in get_method(method).factors:
        m = g[idx[k]][:, idx[k]]
        m = m / torch.trace(m).clamp_min(1e-30)
        if damping and prior is not None:
            p = prior[k] @ prior[k].T
            m = m + damping * p / torch.trace(p).clamp_min(1e-30)
        out[k] = _sqrtm(m)
    return out


def _left_weights(attn, stats: dict, i: int, method: str, rest: list[list[int]] | None,
                  key_weight: float) -> dict[str, torch.Tensor]:
    """The left weight of each matrix :func:`convert` factors (see :func:`output_weights`), by the method's
    latents: ``k`` (keys: ``rest`` rows per head, or all), ``v`` (values) or ``kv`` (keys over values). In
    a joint matrix the key and value blocks are first scaled to their unweighted whitened norms, then the
    keys by ``key_weight``, so the weighting reshapes each block without shifting the balance between them."""
    d = attn.head_dim
    h = attn.k_proj.out_features // d
    rows = [torch.tensor(r, dtype=torch.long) for r in rest] if rest is not None else [torch.arange(d)] * h
    lk, lv = output_weights(attn, stats["q2"][i], rows)
    latents = get_method(method).factors
    out = {}
    if "k" in latents:
        out["k"] = torch.diag(lk)
    if "v" in latents:
        out["v"] = lv
    if "kv" not in latents:
        return out
    chol = _whitener(stats["cov"][i])
    wv = attn.v_proj.weight.double() @ chol
    wk = attn.k_proj.weight.double().view(h, d, -1)
    wk = torch.cat([wk[j, r] for j, r in enumerate(rows)]) @ chol
    nk = wk.norm() / (lk[:, None] * wk).norm() if wk.numel() else 1.0
    nv = wv.norm() / (lv @ wv).norm()
    out["kv"] = torch.block_diag(torch.diag(lk) * nk * key_weight, lv * nv)
    return out
