"""Rotary position embeddings (RoPE): the one implementation kvforge uses.

transformers stores keys after RoPE: ``k_rot = k * cos + rotate_half(k) * sin``, with ``cos``/``sin`` from
the model's own rotary module (``model.model.rotary_emb``), evaluated at the token's absolute position.
With the same ``cos`` and ``sin`` (including any attention scaling folded into them) the exact inverse is
``(k_rot * cos - rotate_half(k_rot) * sin) / (cos**2 + sin**2)``. Gemma 3 uses a different rotary base for
sliding and full layers; the layer type picks it.

Shapes: ``x``/``keys`` are ``[..., N, D]`` (typically ``[B, H, N, D]``), ``cos``/``sin`` ``[N, D]`` (or
anything broadcastable to ``x``); ``D`` is the head dim, rotated as pairs ``(i, i + D/2)``.

    cos, sin = cos_sin(model, torch.arange(n), "full_attention")   # [n, D] float32
    plain = remove_rope(keys, cos, sin)                             # un-rotated keys
    again = apply_rope(plain, cos, sin)                             # == keys (up to rounding)
"""

from __future__ import annotations

import torch


def rotary_module(model):
    """The model's rotary embedding module (``model.model.rotary_emb``); ``ValueError`` if it has none."""
    from .models import inner_module

    return inner_module(model, "rotary_emb")


def rotary_cos_sin(rotary, positions: torch.Tensor, layer_type: str | None = None,
                   dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` ``[N, D]`` of a rotary module at absolute ``positions`` ``[N]`` (on their device), computed
    in ``dtype``. A module with several layer types (Gemma 3) uses ``layer_type`` (its first type if unknown)."""
    x = torch.zeros(1, dtype=dtype, device=positions.device)
    pos = positions.reshape(1, -1)
    if getattr(rotary, "layer_types", None):
        kind = layer_type if layer_type in rotary.layer_types else rotary.layer_types[0]
        cos, sin = rotary(x, pos, kind)
    else:
        cos, sin = rotary(x, pos)
    return cos[0], sin[0]


@torch.no_grad()
def cos_sin(model, positions: torch.Tensor, layer_type: str | None = None,
            dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` ``[N, D]`` (float32, on the model's device) of ``model`` at absolute ``positions`` ``[N]``
    for one layer type; computed in ``dtype``."""
    device = next(model.parameters()).device
    cos, sin = rotary_cos_sin(rotary_module(model), positions.to(device), layer_type, dtype)
    return cos.float(), sin.float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[..., D]`` -> ``[..., D]``: ``(x1, x2) -> (-x2, x1)`` on the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in ``x``'s own dtype: ``x [..., N, D]`` with ``cos/sin`` broadcastable to it -> same shape."""
    return x * cos + rotate_half(x) * sin


def apply_rope(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``keys [B, H, N, D]`` (un-rotated) -> rotated at the positions ``cos/sin [N, D]`` were made for
    (computed in float32, returned in ``keys``' dtype)."""
    return rotate(keys.float(), cos, sin).to(keys.dtype)


def remove_rope(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`apply_rope`: ``keys [B, H, N, D]`` rotated with ``cos/sin [N, D]`` -> un-rotated
    (exact up to float rounding)."""
    k = keys.float()
    return ((k * cos - rotate_half(k) * sin) / (cos * cos + sin * sin)).to(keys.dtype)
