"""Latent attention: the cache holds low-rank latents of the keys and values instead of the keys and values.

Three layouts (one per conversion method), each a drop-in replacement of a Llama- or Gemma-3-style
attention module (q/k norms, GQA/MQA, sliding and full layers, any rotary base):

- ``separate``: ``c_k = A_k x`` and ``c_v = A_v x`` are cached; keys ``RoPE(norm(B_k c_k))`` and values
  ``B_v c_v`` are rebuilt for the whole past at every step (the decompress-every-step baseline; RoPE on all
  dimensions, so at full rank this is exactly the original model).
- ``joint``: one latent ``c = A x`` for both, rebuilt the same way.
- ``decoupled_rope``: per KV head a few rotary frequency pairs are kept uncompressed (cached after RoPE,
  as the original model would); the other key dimensions lose their rotation and share one latent with
  the values. Attention then runs on the latents with the up-projections absorbed into the query and
  output sides, so no step rebuilds past keys or values (``absorb=True``, the default); ``absorb=False``
  computes the same thing by decompressing, for comparison.

Cache layout per layer (a transformers ``DynamicLayer``/``DynamicSlidingWindowLayer``, so KV-state
export, save/load and crop work unchanged): ``keys [B, 1, T, *]`` and ``values [B, 1, T, *]``:

============== ================================================ ===============
method          keys                                             values
============== ================================================ ===============
separate        ``c_k`` (r_k)                                    ``c_v`` (r_v)
joint           ``c`` (r)                                        empty (0)
decoupled_rope  rotated kept dims (H*d_r), key scales (H if k_norm) ``c`` (r)
============== ================================================ ===============
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..rope import rotary_cos_sin, rotate

METHODS = ("separate", "joint", "decoupled_rope")


def _norm_eps(norm: nn.Module) -> float:
    return float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))


def _norm_gain(norm: nn.Module, dim: int, dtype) -> torch.Tensor:
    """The per-dimension gain of an RMS norm (``weight`` for Llama-style, ``1 + weight`` for Gemma-style),
    read off the module itself: its output on a constant vector (differentiable in its weight)."""
    ones = torch.ones(dim, dtype=dtype, device=next(norm.parameters()).device)
    return norm(ones) * (1.0 + _norm_eps(norm)) ** 0.5


def attention_modules(model) -> list:
    """The attention module of every decoder layer (``model.model.layers[i].self_attn``), in layer order."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder layers found (model.model.layers)")
    return [layer.self_attn for layer in layers]


class LatentAttention(nn.Module):
    """Replaces one attention module; keeps its ``q_proj``, ``o_proj`` and norms, and replaces ``k_proj`` and
    ``v_proj`` by down- and up-projections (``down_*``, ``up_*``; ``rope_k`` for the kept rotary dims)."""

    def __init__(self, attn: nn.Module, method: str, ranks: dict[str, int], rotary, layer_type: str | None,
                 kept: torch.Tensor | None = None):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown MLA method {method!r}; choose from {', '.join(METHODS)}")
        self.method, self.layer_type = method, layer_type
        self.config, self.layer_idx = attn.config, attn.layer_idx
        self.head_dim = attn.head_dim
        self.num_heads = attn.q_proj.out_features // self.head_dim
        self.num_kv_heads = attn.k_proj.out_features // self.head_dim
        self.scaling = attn.scaling
        self.softcap = getattr(attn, "attn_logit_softcapping", None)
        self.sliding_window = getattr(attn, "sliding_window", None)
        self.is_causal = True
        self.q_proj, self.o_proj = attn.q_proj, attn.o_proj
        self.q_norm = getattr(attn, "q_norm", None)
        self.k_norm = getattr(attn, "k_norm", None)
        self._rotary = [rotary]  # a list: not a submodule (it belongs to the model)
        self.absorb = True
        hidden = attn.q_proj.in_features
        h, d = self.num_kv_heads, self.head_dim
        dtype = attn.k_proj.weight.dtype
        kb, vb = attn.k_proj.bias is not None, attn.v_proj.bias is not None

        def lin(i, o):
            return nn.Linear(i, o, bias=False, dtype=dtype)

        def param(*shape):
            return nn.Parameter(torch.zeros(*shape, dtype=dtype))

        # up-projections are plain matrices with orthonormal columns at initialisation (fine-tuning keeps
        # them on the Stiefel manifold): separate has one per latent; joint/decoupled one for keys and
        # values stacked, [keys rows; values rows] x r
        self.ranks = dict(ranks)
        if method == "separate":
            self.down_k, self.down_v = lin(hidden, ranks["k"]), lin(hidden, ranks["v"])
            self.up_k, self.up_v = param(h * d, ranks["k"]), param(h * d, ranks["v"])
            n_k = h * d
        else:
            if method == "decoupled_rope":
                if kept is None:
                    raise ValueError("decoupled_rope needs the kept rotary frequency pairs per KV head")
                pairs = kept.shape[1]
                self.register_buffer("kept_pairs", kept.long().clone())  # [H, pairs], frequency indices < d/2
                dims = torch.cat([self.kept_pairs, self.kept_pairs + d // 2], 1)  # each pair is (i, i + d/2)
                rest = torch.stack([torch.tensor([j for j in range(d) if j not in set(row.tolist())],
                                                 dtype=torch.long) for row in dims])
                self.register_buffer("kept_dims", dims)  # [H, 2*pairs]
                self.register_buffer("rest_dims", rest)  # [H, d - 2*pairs]
                self.rope_k = nn.Linear(hidden, h * 2 * pairs, bias=kb, dtype=dtype)
                n_k = h * (d - 2 * pairs)
            else:
                n_k = h * d
            self.down = lin(hidden, ranks["kv"])
            self.up = param(n_k + h * d, ranks["kv"])
        self.n_k = n_k
        self.k_bias = param(n_k) if kb else None
        self.v_bias = param(h * d) if vb else None
        if self.k_norm is not None:
            self.k_eps = _norm_eps(self.k_norm)

    # ------------------------------------------------------------------ helpers
    def up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value up-projections ``[rows, r]``."""
        if self.method == "separate":
            return self.up_k, self.up_v
        return self.up[: self.n_k], self.up[self.n_k:]

    def stiefel(self) -> list[nn.Parameter]:
        """The parameters whose columns are orthonormal (kept so by fine-tuning)."""
        return [self.up_k, self.up_v] if self.method == "separate" else [self.up]

    @property
    def kept(self) -> int:
        return self.kept_dims.shape[1] if self.method == "decoupled_rope" else 0

    def cache_dims(self) -> int:
        """Numbers cached per token by this layer (keys and values together)."""
        h = self.num_kv_heads
        if self.method == "separate":
            return self.ranks["k"] + self.ranks["v"]
        if self.method == "joint":
            return self.ranks["kv"]
        return h * self.kept + (h if self.k_norm is not None else 0) + self.ranks["kv"]

    def _cos_sin(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin`` ``[T, D]`` in ``dtype`` at ``positions`` ``[T]`` (computed in float32)."""
        cos, sin = rotary_cos_sin(self._rotary[0], positions, self.layer_type)
        return cos.to(dtype), sin.to(dtype)

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, heads, -1).transpose(1, 2)  # [B, heads, T, *]

    def _knorm(self, k: torch.Tensor) -> torch.Tensor:
        return self.k_norm(k) if self.k_norm is not None else k

    @staticmethod
    def _seen(cache, layer_idx: int, held: int) -> int:
        """Tokens this layer has seen in all (a sliding layer holds only its last ``held``)."""
        layer = cache.layers[layer_idx]
        return int(getattr(layer, "cumulative_length", 0) or held)

    # ------------------------------------------------------------------ forward
    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        b, q_len, _ = hidden_states.shape
        q = self._heads(self.q_proj(hidden_states), self.num_heads)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.method == "decoupled_rope":
            out = self._decoupled(hidden_states, q, position_embeddings, attention_mask, cache)
        else:
            out = self._decompressed(hidden_states, q, attention_mask, cache)
        return self.o_proj(out.transpose(1, 2).reshape(b, q_len, -1)), None

    def _update(self, cache, keys: torch.Tensor, values: torch.Tensor):
        if cache is None:
            return keys, values, keys.shape[2]
        k, v = cache.update(keys, values, self.layer_idx)
        return k, v, self._seen(cache, self.layer_idx, k.shape[2])

    def _decompressed(self, x, q, mask, cache):
        """separate / joint: cache the latents, rebuild the past's keys and values, rotate all keys at their
        positions. Queries and keys are rotated by their index in this layer's token stream: RoPE depends
        only on differences, so this equals the model's own positions (padding included)."""
        if self.method == "separate":
            ck, cv = self.down_k(x)[:, None], self.down_v(x)[:, None]
        else:
            ck = self.down(x)[:, None]
            cv = ck[..., :0]
        ck, cv, seen = self._update(cache, ck, cv)
        if self.method == "joint":
            cv = ck
        held, q_len = ck.shape[2], q.shape[2]
        w_k, w_v = self.up_weights()
        k = self._knorm(self._heads(F.linear(ck[:, 0], w_k, self.k_bias), self.num_kv_heads))
        v = self._heads(F.linear(cv[:, 0], w_v, self.v_bias), self.num_kv_heads)
        pos = torch.arange(seen - held, seen, device=x.device)
        cos, sin = self._cos_sin(pos, q.dtype)
        k = rotate(k, cos, sin)
        q = rotate(q, cos[-q_len:], sin[-q_len:])
        return self._attend(q, k, v, mask)

    def _decoupled(self, x, q, position_embeddings, mask, cache):
        h, d, kept = self.num_kv_heads, self.head_dim, self.kept
        b, q_len = x.shape[:2]
        cos, sin = position_embeddings
        cos, sin = cos[:, None].to(q.dtype), sin[:, None].to(q.dtype)  # [B, 1, Q, D]
        gain = _norm_gain(self.k_norm, d, q.dtype) if self.k_norm is not None else None
        c = self.down(x)  # [B, Q, r]
        u_p = self._heads(self.rope_k(x), h)  # [B, H, Q, kept] pre-norm, pre-rotation
        up_k, up_v = self.up_weights()
        u_n = self._heads(F.linear(c, up_k, self.k_bias), h)  # [B, H, Q, d - kept]
        if self.k_norm is not None:
            scale = torch.rsqrt((u_p.float().pow(2).sum(-1, keepdim=True) + u_n.float().pow(2).sum(-1, keepdim=True))
                                / d + self.k_eps).to(q.dtype)  # [B, H, Q, 1]
        else:
            scale = None
        # the kept dims, normalised and rotated as the original model would (a full-width vector is rotated
        # and the kept dims read back: rotation acts within each (i, i + d/2) pair)
        full = torch.zeros(b, h, q_len, d, dtype=q.dtype, device=x.device)
        idx_p = self.kept_dims[None, :, None, :].expand(b, h, q_len, kept)
        g_p = gain[self.kept_dims][None, :, None] if gain is not None else 1.0
        full.scatter_(3, idx_p, u_p * (scale if scale is not None else 1.0) * g_p)
        k_p = rotate(full, cos, sin).gather(3, idx_p)  # [B, H, Q, kept]
        parts = [k_p.transpose(1, 2).reshape(b, q_len, h * kept)]
        if scale is not None:
            parts.append(scale[..., 0].transpose(1, 2))  # [B, Q, H]
        keys, lat, _ = self._update(cache, torch.cat(parts, -1)[:, None], c[:, None])
        t = keys.shape[2]
        k_p = keys[:, 0, :, : h * kept].view(b, t, h, kept).transpose(1, 2)  # [B, H, T, kept]
        s = keys[:, 0, :, h * kept:].transpose(1, 2)[..., None] if scale is not None else None  # [B, H, T, 1]
        lat = lat[:, 0]  # [B, T, r]
        g = self.num_heads // h
        q_rot = rotate(q, cos, sin)
        q_idx = self.kept_dims.repeat_interleave(g, 0)[None, :, None].expand(b, -1, q_len, -1)
        r_idx = self.rest_dims.repeat_interleave(g, 0)[None, :, None].expand(b, -1, q_len, -1)
        q_p = q_rot.gather(3, q_idx)  # [B, Hq, Q, kept] rotated
        q_n = q.gather(3, r_idx)  # [B, Hq, Q, d - kept] not rotated
        if scale is not None:
            q_n = q_n * gain[self.rest_dims].repeat_interleave(g, 0)[None, :, None]
        r = lat.shape[-1]
        w_k = up_k.view(h, d - kept, r).repeat_interleave(g, 0)  # [Hq, d - kept, r]
        w_v = up_v.view(h, d, r).repeat_interleave(g, 0)  # [Hq, d, r]
        if self.absorb:
            # the query heads of each KV head side by side ([B, H, g*Q, *]), so that the cached rotated dims
            # and scales are read once per KV head instead of copied per query head
            def grouped(x: torch.Tensor) -> torch.Tensor:
                return x.reshape(b, h, g * q_len, x.shape[-1])

            q_lat = torch.einsum("bhqe,her->bhqr", q_n, w_k)  # the key up-projection absorbed into the query
            scores = grouped(q_p) @ k_p.transpose(-1, -2) + self._scaled(
                grouped(q_lat) @ lat[:, None].transpose(-1, -2), s)
            if self.k_bias is not None:
                qb = (q_n * self.k_bias.view(h, -1).repeat_interleave(g, 0)[None, :, None]).sum(-1, keepdim=True)
                scores = scores + self._scaled(grouped(qb).expand(-1, -1, -1, t), s)
            probs = self._probs(scores.view(b, h * g, q_len, t), mask)
            out = torch.einsum("bhqr,hdr->bhqd", probs @ lat[:, None], w_v)  # the value up-projection after
            if self.v_bias is not None:
                out = out + self.v_bias.view(h, d).repeat_interleave(g, 0)[None, :, None]
            return out
        # decompress-every-step: rebuild the past's keys and values, then ordinary attention
        k_p = k_p.repeat_interleave(g, 1)
        s = s.repeat_interleave(g, 1) if s is not None else None
        k_n = F.linear(lat, up_k, self.k_bias).view(b, t, h, d - kept).transpose(1, 2).repeat_interleave(g, 1)
        k_n = k_n * s if s is not None else k_n
        v = F.linear(lat, up_v, self.v_bias).view(b, t, h, d).transpose(1, 2).repeat_interleave(g, 1)
        scores = q_p @ k_p.transpose(-1, -2) + q_n @ k_n.transpose(-1, -2)
        return self._probs(scores, mask) @ v

    @staticmethod
    def _scaled(scores: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
        return scores if s is None else scores * s.transpose(-1, -2)

    def _probs(self, scores: torch.Tensor, mask) -> torch.Tensor:
        scores = scores.float() * self.scaling
        if self.softcap:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        scores = self._masked(scores, mask)
        return torch.softmax(scores, -1).to(self.q_proj.weight.dtype)

    def _masked(self, scores: torch.Tensor, mask) -> torch.Tensor:
        q_len, t = scores.shape[-2:]
        if mask is None:
            if q_len == 1:
                return scores
            qpos = torch.arange(t - q_len, t, device=scores.device)[:, None]
            kpos = torch.arange(t, device=scores.device)[None]
            keep = kpos <= qpos
            if self.sliding_window:
                keep &= kpos > qpos - self.sliding_window
            return scores.masked_fill(~keep, float("-inf"))
        mask = mask[..., -t:]
        if mask.dtype == torch.bool:
            return scores.masked_fill(~mask, float("-inf"))
        return scores + mask.float()

    def _attend(self, q, k, v, mask):
        g = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        return self._probs(q @ k.transpose(-1, -2), mask) @ v
