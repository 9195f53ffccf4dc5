"""What a translator reads besides the aligned source token: a window of source tokens and the target's own
token-local features.

Token-local features need no attention over the context, so the target computes them for every token of
the text it is handed at almost no cost (one embedding lookup and one projection per token):

* the target's input embedding of the token and of its ``neighbours`` previous tokens (zeros before the
  text starts), as the model itself scales them (Gemma multiplies by ``sqrt(hidden)``);
* the target's own layer-0 keys (un-rotated, after ``k_norm`` where the model has one) and values: layer 0
  reads nothing but its own token's embedding before its keys and values are projected, so these are
  *exactly* the target's layer-0 cache, not an estimate.

Names, numbers and other rare tokens keep their identity through these features even when the source
model's cache blurs them (``FINDINGS.md``: the embedding alone explains 95-97% of layer 0 and 70-80% of
layers 1-2 of Gemma 3's cache). The window of source tokens (the aligned one and the ``window - 1`` before
it) covers the source tokens that overlap a target token when the two tokenizers split a name differently.
"""

from __future__ import annotations

import torch

from ..state import KVStateError


def decoder_layers(model):
    """The model's decoder layers (``model.model.layers``)."""
    from ..models import inner_module

    return inner_module(model, "layers")


@torch.no_grad()
def token_local(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The target's token-local features of token ids ``[N]``: input embeddings ``[N, hidden]`` and layer 0's
    un-rotated keys and values ``[kv_heads, N, head_dim]`` (float32). No attention is computed: every row
    depends on its own token only.

    Raises ``ValueError`` for a model whose layer 0 has no ``input_layernorm`` / ``self_attn.k_proj`` /
    ``v_proj`` (Llama, Gemma 3 and their relatives have them)."""
    layer = decoder_layers(model)[0]
    attn = getattr(layer, "self_attn", None)
    norm = getattr(layer, "input_layernorm", None)
    if attn is None or norm is None or not hasattr(attn, "k_proj") or not hasattr(attn, "v_proj"):
        raise ValueError(f"{type(model).__name__}: layer 0 has no input_layernorm/self_attn.k_proj/v_proj; "
                         "token-local features are not defined for it")
    device = next(model.parameters()).device
    emb = model.get_input_embeddings()(ids.to(device)[None])[0]
    h = norm(emb[None])[0]
    d = attn.head_dim
    k = attn.k_proj(h).view(len(ids), -1, d)
    v = attn.v_proj(h).view(len(ids), -1, d)
    if getattr(attn, "k_norm", None) is not None:
        k = attn.k_norm(k)
    if getattr(attn, "v_norm", None) is not None:
        v = attn.v_norm(v)
    return emb.float(), k.transpose(0, 1).float(), v.transpose(0, 1).float()


def token_features(emb: torch.Tensor, k0: torch.Tensor, v0: torch.Tensor, neighbours: int) -> torch.Tensor:
    """``[N, (neighbours + 1) * hidden + 2 * kv_heads * head_dim]``: each token's embedding, its ``neighbours``
    previous tokens' embeddings (zeros before the first token) and its own layer-0 keys and values."""
    n = emb.shape[0]
    parts = [emb]
    for s in range(1, neighbours + 1):
        parts.append(torch.cat([emb.new_zeros(min(s, n), emb.shape[1]), emb[: max(n - s, 0)]]))
    parts += [k0.transpose(0, 1).reshape(n, -1), v0.transpose(0, 1).reshape(n, -1)]
    return torch.cat(parts, 1)


def flat_kv(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[n, 2 * heads * head_dim]``: each token's keys then values (``k``, ``v``: ``[1, heads, n, head_dim]``)."""
    n = k.shape[2]
    return torch.stack([k[0], v[0]]).permute(2, 0, 1, 3).reshape(n, -1)


def gather_slot(rows: torch.Tensor, index: torch.Tensor, slot: int, total: int, layer: int = 0) -> torch.Tensor:
    """``[Nt, F]``: row ``index[t] - slot`` of ``rows`` (``[n, F]``, a layer holding the last ``n`` of ``total``
    tokens) for each target token, zeros where that falls before the text or out of the layer, or where the
    target token is special (``index < 0``). Slot 0 out of a sliding layer raises ``KVStateError``."""
    n = rows.shape[0]
    pos = index - slot
    ok = (index >= 0) & (pos >= 0)
    off = pos - (total - n)  # a sliding source layer holds only its last n tokens
    if slot == 0 and (off[ok] < 0).any():
        raise KVStateError(f"source layer {layer} holds only its last {n} tokens; the alignment needs older ones")
    ok = ok & (off >= 0)
    return torch.where(ok[:, None], rows[off.clamp(0, n - 1)], rows.new_zeros(()))


def len_total(src: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Tokens of the longest (full-attention) source layer: the whole text."""
    return max(k.shape[2] for k, _ in src.values())


def source_window(src: dict[int, tuple[torch.Tensor, torch.Tensor]], index: torch.Tensor,
                  window: int) -> dict[int, torch.Tensor]:
    """Per source layer, ``[Nt, window, 2 * heads * head_dim]``: keys then values of the source token aligned
    with each target token (slot 0) and of the ``window - 1`` source tokens before it (slots 1...), zeros
    where a slot falls before the text or the target token is special (``index < 0``). Batch 1."""
    total = len_total(src)
    out = {}
    for j, (k, v) in src.items():
        flat = flat_kv(k, v)
        out[j] = torch.stack([gather_slot(flat, index, s, total, j) for s in range(window)], 1)
    return out


class PCA(torch.nn.Module):
    """A fixed linear reduction ``(x - mean) @ basis`` fitted by principal components (float32 buffers)."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("basis", torch.zeros(dim, rank))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> PCA:
        """Fit on rows ``x`` ``[n, dim]``: the top ``rank`` principal directions, scaled to unit variance (a
        direction with less than 1e-3 of the largest variance is scaled as if it had that much)."""
        x = x.double()
        mean = x.mean(0)
        cov = (x - mean).T @ (x - mean) / max(len(x) - 1, 1)
        evals, evecs = torch.linalg.eigh(cov)
        r = self.basis.shape[1]
        top = evals.flip(0)[:r]
        top = top.clamp_min(max(float(top[0]), 1e-12) * 1e-3)
        self.mean.copy_(mean.float())
        self.basis.copy_((evecs.flip(1)[:, :r] / top.sqrt()).float())
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x)) @ self.basis.to(x)
