"""Rotary position embeddings of cached keys: remove them with the source model's own rotary module,
apply the target's at the target's positions.

transformers stores keys after RoPE: ``k_rot = k * cos + rotate_half(k) * sin``. With the same ``cos``
and ``sin`` (including any attention scaling folded into them) the exact inverse is
``(k_rot * cos - rotate_half(k_rot) * sin) / (cos**2 + sin**2)``. Gemma 3 uses a different rotary base
for sliding and full layers; the layer type picks it.
"""

from __future__ import annotations

import torch


def rotary_module(model):
    base = getattr(model, "model", model)
    rot = getattr(base, "rotary_emb", None)
    if rot is None:
        raise ValueError(f"{type(model).__name__} has no rotary embedding module (model.model.rotary_emb)")
    return rot


@torch.no_grad()
def cos_sin(model, positions: torch.Tensor, layer_type: str | None = None, dtype=torch.float32):
    """``cos, sin`` ``[N, head_dim]`` of ``model`` at absolute ``positions`` for one layer type."""
    rot = rotary_module(model)
    device = next(model.parameters()).device
    x = torch.zeros(1, dtype=dtype, device=device)
    pos = positions.to(device).reshape(1, -1)
    if getattr(rot, "layer_types", None):
        kind = layer_type if layer_type in rot.layer_types else rot.layer_types[0]
        cos, sin = rot(x, pos, kind)
    else:
        cos, sin = rot(x, pos)
    return cos[0].float(), sin[0].float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``keys [B, H, N, D]`` (un-rotated) -> rotated at the positions ``cos/sin [N, D]`` were made for."""
    k = keys.float()
    return (k * cos + rotate_half(k) * sin).to(keys.dtype)


def remove_rope(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`apply_rope` (exact up to float rounding)."""
    k = keys.float()
    return ((k * cos - rotate_half(k) * sin) / (cos * cos + sin * sin)).to(keys.dtype)
