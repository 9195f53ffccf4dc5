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
    sink: int = 0  # the first `sink` recent tokens are the sequence's first tokens (before the codes)

    @property
    def quantized_tokens(self) -> int:
        return self.k_codes.shape[2]

    @property
    def shape(self):  # what attention code may ask of a key tensor
        b, h, r, d = self.recent_k.shape
        return torch.Size((b, h, self.quantized_tokens + r, d))

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layer._dense(self.k_codes, self.k_scale, self.k_zero, self.v_codes, self.v_scale,
                                 self.v_zero, self.recent_k, self.recent_v, sink=self.sink)

    def stored_dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All tokens in full precision in the stored space (rotations kept): what attention needs when the
        query is rotated the same way, without a rotation of every key."""
        layer, cfg, rk, rv = self.layer, self.layer.config, self.recent_k, self.recent_v
        if self.quantized_tokens == 0:
            return rk, rv
        from .kivi import dequantize_keys, dequantize_values

        k = dequantize_keys(self.k_codes, self.k_scale, self.k_zero, cfg.key_bits, cfg.key_group, layer.head_dim, rk.dtype)
        v = dequantize_values(self.v_codes, self.v_scale, self.v_zero, cfg.value_bits, cfg.value_group,
                              layer.value_dim, rv.dtype)
        s = self.sink
        return torch.cat([rk[:, :, :s], k, rk[:, :, s:]], 2), torch.cat([rv[:, :, :s], v, rv[:, :, s:]], 2)

    def kernel_order(self, mask: torch.Tensor) -> torch.Tensor:
        """``mask [..., KV]`` over the stored tokens in sequence order -> in the order attention on the codes
        reads them (the codes first, then the recent tokens, the sink tokens first among them)."""
        s, n = self.sink, self.quantized_tokens
        if not s or not n:
            return mask
        return torch.cat([mask[..., s : s + n], mask[..., :s], mask[..., s + n :]], -1)

    @staticmethod
    def rows(views: list[QuantizedView], need: list[int]) -> QuantizedRows:
        """The views of several sequences (batch 1 each) for one decode step; row ``r`` attends to its last
        ``need[r]`` stored tokens."""
        return QuantizedRows(views, need)


@dataclass
class QuantizedRows:
    """One layer's quantized views of ``B`` sequences of different lengths in one decode step (the server's
    batched step): the compiled kernel reads each sequence's codes where they lie, with no padded copy."""

    views: list[QuantizedView]
    need: list[int]  # per row: how many of its last stored tokens its query attends to

    @property
    def starts(self) -> list[int]:
        """Per row, the first stored token attended to."""
        return [v.shape[2] - n for v, n in zip(self.views, self.need)]

    @property
    def shape(self):
        b, h, _, d = self.views[0].recent_k.shape
        return torch.Size((len(self.views), h, max(self.need), d))

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, H, max(need), D]`` in the model's space, left-padded with zeros."""
        length = max(self.need)
        keys = values = None
        for r, (view, n) in enumerate(zip(self.views, self.need)):
            k, v = view.dense()
            if keys is None:
                keys = k.new_zeros(len(self.views), k.shape[1], length, k.shape[3])
                values = v.new_zeros(len(self.views), v.shape[1], length, v.shape[3])
            keys[r, :, length - n :] = k[0, :, -n:]
            values[r, :, length - n :] = v[0, :, -n:]
        return keys, values
