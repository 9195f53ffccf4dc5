"""What a quantized layer hands to attention on the fused path (kept apart from the layer class so that
the attention function and the layer import it without importing each other)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class QuantizedView:
    """What a quantized layer hands to attention when the fused path is on: the quantized past as
    codes (not dequantized) plus the recent tokens in full precision, all in the rotated space."""

    layer: Any  # the QuantizedLayer that holds these tensors
    k_codes: torch.Tensor
    k_scale: torch.Tensor
    k_zero: torch.Tensor
    v_codes: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor
    recent_k: torch.Tensor  # [B, H, R', D] compute dtype, rotated if keys are rotated
    recent_v: torch.Tensor

    @property
    def quantized_tokens(self) -> int:
        return self.k_codes.shape[2]

    @property
    def shape(self):  # what attention code may ask of a key tensor
        b, h, r, d = self.recent_k.shape
        return torch.Size((b, h, self.quantized_tokens + r, d))

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layer._dense(self.k_codes, self.k_scale, self.k_zero, self.v_codes, self.v_scale,
                                 self.v_zero, self.recent_k, self.recent_v)
