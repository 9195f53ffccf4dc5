"""Latent attention: the cache holds low-rank latents of the keys and values instead of the keys and values.

Three layouts (one per conversion method, each a class in :mod:`kvforge.mla.methods` that
:class:`LatentAttention` calls for what differs), each a drop-in replacement of a Llama- or Gemma-3-style
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
from torch import nn

from ..rope import rotary_cos_sin
from .methods import METHODS, REGISTRY, LatentMethod, _norm_eps, _zeros, get_method

__all__ = ["METHODS", "REGISTRY", "LatentAttention", "LatentMethod", "attention_modules", "get_method"]


def attention_modules(model) -> list:
    """The attention module of every decoder layer (``model.model.layers[i].self_attn``), in layer order."""
    from ..models import inner_module

    return [layer.self_attn for layer in inner_module(model, "layers")]


class LatentAttention(nn.Module):
    """Replaces one attention module; keeps its ``q_proj``, ``o_proj`` and norms, and replaces ``k_proj`` and
    ``v_proj`` by down- and up-projections (``down_*``, ``up_*``; ``rope_k`` for the kept rotary dims)."""

    def __init__(self, attn: nn.Module, method: str, ranks: dict[str, int], rotary, layer_type: str | None,
                 kept: torch.Tensor | None = None, bias: bool = False):
        super().__init__()
        self.impl: LatentMethod = get_method(method)  # what differs between methods (kvforge.mla.methods)
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
        dtype = attn.k_proj.weight.dtype
        self.ranks = dict(ranks)
        self.n_k = self.impl.key_width(self, kept)
        self.impl.build(self, attn, kept)
        # biases after the up-projections: the original ones, or the bias correction of a conversion (bias=True)
        self.k_bias = _zeros(dtype, self.n_k) if bias or attn.k_proj.bias is not None else None
        self.v_bias = _zeros(dtype, self.num_kv_heads * self.head_dim) if bias or attn.v_proj.bias is not None else None
        if self.k_norm is not None:
            self.k_eps = _norm_eps(self.k_norm)

    # ------------------------------------------------------------------ helpers
    def up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value up-projections ``[rows, r]``."""
        return self.impl.up_weights(self)

    def stiefel(self) -> list[nn.Parameter]:
        """The parameters whose columns are orthonormal (kept so by fine-tuning)."""
        return self.impl.stiefel(self)

    @property
    def kept(self) -> int:
        """Key dims per KV head kept uncompressed (decoupled_rope's rotary pairs; 0 for the others)."""
        return self.impl.kept(self)

    def cache_dims(self) -> int:
        """Numbers cached per token by this layer (keys and values together)."""
        return self.impl.cache_dims(self)

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
        out = self.impl.attend(self, hidden_states, q, position_embeddings, attention_mask, cache)
        return self.o_proj(out.transpose(1, 2).reshape(b, q_len, -1)), None

    def _update(self, cache, keys: torch.Tensor, values: torch.Tensor):
        if cache is None:
            return keys, values, keys.shape[2]
        k, v = cache.update(keys, values, self.layer_idx)
        return k, v, self._seen(cache, self.layer_idx, k.shape[2])

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
