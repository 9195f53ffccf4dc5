"""The MLA methods: one small class each, over :class:`LatentMethod`, registered by name in :data:`REGISTRY`.

A method owns everything that differs between layouts of :class:`~kvforge.mla.attention.LatentAttention`:
the parameters it adds (down-projections, up-projections with orthonormal columns, kept rotary rows),
what the cache holds (:meth:`LatentMethod.cache_dims`), how keys and values are compressed and rebuilt
(:meth:`LatentMethod.attend`, the absorbed decode path included) and its factorisation step in
:func:`kvforge.mla.convert` (which matrices are factored, which rotary pairs are kept, how the factors
are copied in). ``LatentAttention`` keeps what all share (queries, norms, masks, softmax, the cache update).

Method objects hold no tensors: every tensor is registered on the attention module (``m``), so state
dict names are the same for all methods that have them (``down``, ``up``, ``down_k``, ``rope_k``, ...).
A new method is one subclass plus one line in :data:`REGISTRY`; its name is what ``convert(method=...)``,
``kvforge_mla.json`` and the CLI use.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..rope import rotate


def _norm_eps(norm: nn.Module) -> float:
    return float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))


def _norm_gain(norm: nn.Module, dim: int, dtype) -> torch.Tensor:
    """The per-dimension gain of an RMS norm (``weight`` for Llama-style, ``1 + weight`` for Gemma-style),
    read off the module itself: its output on a constant vector (differentiable in its weight)."""
    ones = torch.ones(dim, dtype=dtype, device=next(norm.parameters()).device)
    return norm(ones) * (1.0 + _norm_eps(norm)) ** 0.5


def _zeros(dtype, *shape) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape, dtype=dtype))


def _scaled(scores: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    return scores if s is None else scores * s.transpose(-1, -2)


class LatentMethod:
    """One MLA layout. The default behaviour is the decompress-every-step one: the cache holds the
    latents (:meth:`compress`), and every step rebuilds the past's keys and values from them, normalises
    and rotates all keys at their positions and attends as the original model does.

    ``factors`` maps each latent (a key of ``MLAConfig.ranks``: ``"k"`` keys, ``"v"`` values, ``"kv"``
    keys stacked over values) to the names of its down-projection module and up-projection parameter.
    ``m`` is the :class:`~kvforge.mla.attention.LatentAttention` (``new`` in conversion), ``a`` the
    original attention module it replaces."""

    factors: ClassVar[dict[str, tuple[str, str]]] = {}
    extra_trainable: ClassVar[tuple[str, ...]] = ()  # further modules fine-tuning trains (besides the downs)
    rope_stats: ClassVar[bool] = False  # conversion needs rotary pair statistics (so calibration text)

    # ------------------------------------------------------------------ the module's parameters
    def key_width(self, m, kept: torch.Tensor | None) -> int:
        """Rows of the key up-projection (compressed key dims of all KV heads)."""
        return m.num_kv_heads * m.head_dim

    def up_rows(self, m, latent: str) -> int:
        raise NotImplementedError

    def build(self, m, attn: nn.Module, kept: torch.Tensor | None) -> None:
        """Register this method's parameters on ``m`` (``m.ranks`` and ``m.n_k`` are set), replacing the
        original ``attn``'s k_proj/v_proj; up-projections are plain matrices with orthonormal columns at
        initialisation (fine-tuning keeps them so)."""
        hidden, dtype = attn.q_proj.in_features, attn.k_proj.weight.dtype
        for latent, (down, up) in self.factors.items():
            setattr(m, down, nn.Linear(hidden, m.ranks[latent], bias=False, dtype=dtype))
            setattr(m, up, _zeros(dtype, self.up_rows(m, latent), m.ranks[latent]))

    def up_weights(self, m) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value up-projections ``[rows, r]``."""
        raise NotImplementedError

    def stiefel(self, m) -> list[nn.Parameter]:
        """The parameters whose columns are orthonormal (kept so by fine-tuning)."""
        return [getattr(m, up) for _, up in self.factors.values()]

    def trainable_modules(self, m) -> list[nn.Module]:
        """The modules fine-tuning trains in the Euclidean way (down-projections, kept rotary rows)."""
        return [getattr(m, name) for name in (*(down for down, _ in self.factors.values()), *self.extra_trainable)]

    def kept(self, m) -> int:
        """Key dims per KV head kept uncompressed (rotated, cached as they are)."""
        return 0

    def cache_dims(self, m) -> int:
        """Numbers cached per token by the layer (keys and values together)."""
        return sum(m.ranks[latent] for latent in self.factors)

    # ------------------------------------------------------------------ forward
    def compress(self, m, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache receives for hidden states ``x`` ``[B, Q, hidden]``: ``keys, values [B, 1, Q, *]``."""
        raise NotImplementedError

    def latents(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value latents of what the cache holds."""
        return keys, values

    def attend(self, m, x, q, position_embeddings, mask, cache) -> torch.Tensor:
        """The attention output ``[B, Hq, Q, d]`` for queries ``q`` (normalised, not rotated). Here: cache the
        latents, rebuild the past's keys and values, rotate all keys at their positions. Queries and keys are
        rotated by their index in this layer's token stream: RoPE depends only on differences, so this
        equals the model's own positions (padding included)."""
        ck, cv = self.compress(m, x)
        ck, cv, seen = m._update(cache, ck, cv)
        ck, cv = self.latents(ck, cv)
        held, q_len = ck.shape[2], q.shape[2]
        w_k, w_v = self.up_weights(m)
        k = m._knorm(m._heads(F.linear(ck[:, 0], w_k, m.k_bias), m.num_kv_heads))
        v = m._heads(F.linear(cv[:, 0], w_v, m.v_bias), m.num_kv_heads)
        pos = torch.arange(seen - held, seen, device=x.device)
        cos, sin = m._cos_sin(pos, q.dtype)
        k = rotate(k, cos, sin)
        q = rotate(q, cos[-q_len:], sin[-q_len:])
        return m._attend(q, k, v, mask)

    # ------------------------------------------------------------------ conversion
    def select_kept(self, a, i: int, stats: dict, ratio: float | None, rope_pairs: int | None):
        """Rotary frequency pairs kept per KV head of layer ``i`` (``[H, pairs]``), or None."""
        return None

    def key_rows(self, a, kept) -> list[list[int]] | None:
        """Per KV head, the head dims the key up-projection rebuilds (None: all)."""
        return None

    def matrices(self, a, kept) -> dict[str, torch.Tensor]:
        """The matrix each latent factors, from the original attention module ``a``."""
        raise NotImplementedError

    def extra_cache(self, a, kept) -> int:
        """Numbers cached per token besides the latents (kept rotary dims, key scales)."""
        return 0

    def key_bias(self, new, bias: torch.Tensor) -> torch.Tensor:
        """The part of ``k_proj``'s bias that the key up-projection adds."""
        return bias

    def load(self, new, a, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy each latent's ``(down, up)`` factors into ``new``; biases of k_proj/v_proj move to the
        up-projections."""
        for latent, (down, up) in factors.items():
            down_name, up_name = self.factors[latent]
            getattr(new, down_name).weight.copy_(down)
            getattr(new, up_name).copy_(up)
        if a.v_proj.bias is not None:
            new.v_bias.copy_(a.v_proj.bias)
        if a.k_proj.bias is not None:
            new.k_bias.copy_(self.key_bias(new, a.k_proj.bias))


class SeparateKV(LatentMethod):
    """``c_k = A_k x`` and ``c_v = A_v x`` are cached; keys ``RoPE(norm(B_k c_k))`` and values ``B_v c_v``
    are rebuilt for the whole past at every step."""

    factors = {"k": ("down_k", "up_k"), "v": ("down_v", "up_v")}

    def up_rows(self, m, latent):
        return m.num_kv_heads * m.head_dim

    def up_weights(self, m):
        return m.up_k, m.up_v

    def compress(self, m, x):
        return m.down_k(x)[:, None], m.down_v(x)[:, None]

    def matrices(self, a, kept):
        return {"k": a.k_proj.weight, "v": a.v_proj.weight}


class JointKV(LatentMethod):
    """One latent ``c = A x`` for keys and values (cached as the keys; the values are empty), rebuilt the
    same way; one up-projection, key rows over value rows."""

    factors = {"kv": ("down", "up")}

    def up_rows(self, m, latent):
        return m.n_k + m.num_kv_heads * m.head_dim

    def up_weights(self, m):
        return m.up[: m.n_k], m.up[m.n_k:]

    def compress(self, m, x):
        ck = m.down(x)[:, None]
        return ck, ck[..., :0]

    def latents(self, keys, values):
        return keys, keys

    def matrices(self, a, kept):
        return {"kv": torch.cat([a.k_proj.weight, a.v_proj.weight])}


def _kept_dims(kept: torch.Tensor, d: int) -> tuple[torch.Tensor, list[list[int]]]:
    """The head dims of kept frequency pairs ``[H, pairs]`` (each pair is ``(i, i + d/2)``) and the rest."""
    dims = torch.cat([kept, kept + d // 2], 1)
    return dims, [[j for j in range(d) if j not in set(row.tolist())] for row in dims]


class DecoupledRope(JointKV):
    """Per KV head a few rotary frequency pairs are kept uncompressed (``rope_k``, cached after RoPE as the
    original model would, with the key scales if the model has a k_norm); the other key dimensions lose
    their rotation and share one latent with the values. Attention runs on the latents with the
    up-projections absorbed into the query and output sides (``m.absorb``), or by decompressing."""

    extra_trainable = ("rope_k",)
    rope_stats = True

    def key_width(self, m, kept):
        if kept is None:
            raise ValueError("decoupled_rope needs the kept rotary frequency pairs per KV head")
        return m.num_kv_heads * (m.head_dim - 2 * kept.shape[1])

    def build(self, m, attn, kept):
        h, d = m.num_kv_heads, m.head_dim
        m.register_buffer("kept_pairs", kept.long().clone())  # [H, pairs], frequency indices < d/2
        dims, rest = _kept_dims(m.kept_pairs, d)
        m.register_buffer("kept_dims", dims)  # [H, 2*pairs]
        m.register_buffer("rest_dims", torch.stack([torch.tensor(r, dtype=torch.long) for r in rest]))
        m.rope_k = nn.Linear(attn.q_proj.in_features, h * 2 * kept.shape[1], bias=attn.k_proj.bias is not None,
                             dtype=attn.k_proj.weight.dtype)
        super().build(m, attn, kept)

    def kept(self, m):
        return m.kept_dims.shape[1]

    def cache_dims(self, m):
        return m.num_kv_heads * self.kept(m) + (m.num_kv_heads if m.k_norm is not None else 0) + m.ranks["kv"]

    def attend(self, m, x, q, position_embeddings, mask, cache):
        h, d, kept = m.num_kv_heads, m.head_dim, self.kept(m)
        b, q_len = x.shape[:2]
        cos, sin = position_embeddings
        cos, sin = cos[:, None].to(q.dtype), sin[:, None].to(q.dtype)  # [B, 1, Q, D]
        gain = _norm_gain(m.k_norm, d, q.dtype) if m.k_norm is not None else None
        c = m.down(x)  # [B, Q, r]
        u_p = m._heads(m.rope_k(x), h)  # [B, H, Q, kept] pre-norm, pre-rotation
        up_k, up_v = self.up_weights(m)
        u_n = m._heads(F.linear(c, up_k, m.k_bias), h)  # [B, H, Q, d - kept]
        if m.k_norm is not None:
            scale = torch.rsqrt((u_p.float().pow(2).sum(-1, keepdim=True) + u_n.float().pow(2).sum(-1, keepdim=True))
                                / d + m.k_eps).to(q.dtype)  # [B, H, Q, 1]
        else:
            scale = None
        # the kept dims, normalised and rotated as the original model would (a full-width vector is rotated
        # and the kept dims read back: rotation acts within each (i, i + d/2) pair)
        full = torch.zeros(b, h, q_len, d, dtype=q.dtype, device=x.device)
        idx_p = m.kept_dims[None, :, None, :].expand(b, h, q_len, kept)
        g_p = gain[m.kept_dims][None, :, None] if gain is not None else 1.0
        full.scatter_(3, idx_p, u_p * (scale if scale is not None else 1.0) * g_p)
        k_p = rotate(full, cos, sin).gather(3, idx_p)  # [B, H, Q, kept]
        parts = [k_p.transpose(1, 2).reshape(b, q_len, h * kept)]
        if scale is not None:
            parts.append(scale[..., 0].transpose(1, 2))  # [B, Q, H]
        keys, lat, _ = m._update(cache, torch.cat(parts, -1)[:, None], c[:, None])
        t = keys.shape[2]
        k_p = keys[:, 0, :, : h * kept].view(b, t, h, kept).transpose(1, 2)  # [B, H, T, kept]
        s = keys[:, 0, :, h * kept:].transpose(1, 2)[..., None] if scale is not None else None  # [B, H, T, 1]
        lat = lat[:, 0]  # [B, T, r]
        g = m.num_heads // h
        q_rot = rotate(q, cos, sin)
        q_idx = m.kept_dims.repeat_interleave(g, 0)[None, :, None].expand(b, -1, q_len, -1)
        r_idx = m.rest_dims.repeat_interleave(g, 0)[None, :, None].expand(b, -1, q_len, -1)
        q_p = q_rot.gather(3, q_idx)  # [B, Hq, Q, kept] rotated
        q_n = q.gather(3, r_idx)  # [B, Hq, Q, d - kept] not rotated
        if scale is not None:
            q_n = q_n * gain[m.rest_dims].repeat_interleave(g, 0)[None, :, None]
        r = lat.shape[-1]
        w_k = up_k.view(h, d - kept, r).repeat_interleave(g, 0)  # [Hq, d - kept, r]
        w_v = up_v.view(h, d, r).repeat_interleave(g, 0)  # [Hq, d, r]
        if m.absorb:
            # the query heads of each KV head side by side ([B, H, g*Q, *]), so that the cached rotated dims
            # and scales are read once per KV head instead of copied per query head
            def grouped(x: torch.Tensor) -> torch.Tensor:
                return x.reshape(b, h, g * q_len, x.shape[-1])

            q_lat = torch.einsum("bhqe,her->bhqr", q_n, w_k)  # the key up-projection absorbed into the query
            scores = grouped(q_p) @ k_p.transpose(-1, -2) + _scaled(
                grouped(q_lat) @ lat[:, None].transpose(-1, -2), s)
            if m.k_bias is not None:
                qb = (q_n * m.k_bias.view(h, -1).repeat_interleave(g, 0)[None, :, None]).sum(-1, keepdim=True)
                scores = scores + _scaled(grouped(qb).expand(-1, -1, -1, t), s)
            probs = m._probs(scores.view(b, h * g, q_len, t), mask)
            out = torch.einsum("bhqr,hdr->bhqd", probs @ lat[:, None], w_v)  # the value up-projection after
            if m.v_bias is not None:
                out = out + m.v_bias.view(h, d).repeat_interleave(g, 0)[None, :, None]
            return out
        # decompress-every-step: rebuild the past's keys and values, then ordinary attention
        k_p = k_p.repeat_interleave(g, 1)
        s = s.repeat_interleave(g, 1) if s is not None else None
        k_n = F.linear(lat, up_k, m.k_bias).view(b, t, h, d - kept).transpose(1, 2).repeat_interleave(g, 1)
        k_n = k_n * s if s is not None else k_n
        v = F.linear(lat, up_v, m.v_bias).view(b, t, h, d).transpose(1, 2).repeat_interleave(g, 1)
        scores = q_p @ k_p.transpose(-1, -2) + q_n @ k_n.transpose(-1, -2)
        return m._probs(scores, mask) @ v

    # ------------------------------------------------------------------ conversion
    def select_kept(self, a, i, stats, ratio, rope_pairs):
        """By measured contribution (calibrated pair scores times how much each pair's rotation matters);
        by default a quarter of the head's pairs, at most half of the layer's byte budget."""
        d = a.head_dim
        h = a.k_proj.out_features // d
        pairs = rope_pairs
        if pairs is None:
            pairs = d // 8
            if ratio is not None:
                extra = h if getattr(a, "k_norm", None) is not None else 0
                pairs = max(0, min(pairs, int((2 * h * d / ratio / 2 - extra) // (2 * h))))
        if not 0 <= pairs <= d // 2:
            raise ValueError(f"rope_pairs must be in 0..{d // 2}, got {pairs}")
        score = stats["pair_score"][i] * stats["rotation_loss"][i].to(stats["pair_score"][i])[None]
        return score.topk(pairs, dim=1).indices.sort(dim=1).values.cpu()  # [H, pairs]

    def key_rows(self, a, kept):
        return _kept_dims(kept, a.head_dim)[1]

    def matrices(self, a, kept):
        d = a.head_dim
        rest = self.key_rows(a, kept)
        wk_h = a.k_proj.weight.view(len(rest), d, -1)
        wn = torch.cat([wk_h[j, rest[j]] for j in range(len(rest))])
        return {"kv": torch.cat([wn, a.v_proj.weight])}

    def extra_cache(self, a, kept):
        h = kept.shape[0]
        return h * 2 * kept.shape[1] + (h if getattr(a, "k_norm", None) is not None else 0)

    def key_bias(self, new, bias):
        b = bias.view(new.num_kv_heads, new.head_dim)
        return torch.cat([b[j, new.rest_dims[j]] for j in range(new.num_kv_heads)])

    def load(self, new, a, factors):
        super().load(new, a, factors)
        h, d = new.num_kv_heads, new.head_dim
        wk_h = a.k_proj.weight.view(h, d, -1)
        new.rope_k.weight.copy_(torch.cat([wk_h[j, new.kept_dims[j]] for j in range(h)]))
        if a.k_proj.bias is not None:
            b = a.k_proj.bias.view(h, d)
            new.rope_k.bias.copy_(torch.cat([b[j, new.kept_dims[j]] for j in range(h)]))


REGISTRY: dict[str, type[LatentMethod]] = {
    "separate": SeparateKV,
    "joint": JointKV,
    "decoupled_rope": DecoupledRope,
}
METHODS = tuple(REGISTRY)


def get_method(method: str) -> LatentMethod:
    """The method object of a registered name."""
    if method not in REGISTRY:
        raise ValueError(f"unknown MLA method {method!r}; choose from {', '.join(REGISTRY)}")
    return REGISTRY[method]()
