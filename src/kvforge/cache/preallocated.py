"""A pre-allocated per-layer KV cache with a fixed ``max_seq_len``.

Unlike ``DynamicLayer`` (which concatenates, reallocating its whole history every step), this layer
allocates ``[batch, kv_heads, max_seq_len, head_dim]`` once and writes new tokens in place; attention
reads a view of the filled part. Going past ``max_seq_len`` raises :class:`CacheOverflowError` instead
of silently dropping tokens. Unlike transformers' ``StaticLayer`` it returns only the filled part, so
attention costs grow with the tokens held rather than the capacity.

Sliding-window layers are stored like full layers (every token is kept): the model's sliding mask
still limits what they attend to, so outputs are exact; only the memory saving of a window is lost.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from ..layers import KVLayer, LayerState, register_layer
from ..models import text_config


class CacheOverflowError(RuntimeError):
    """More tokens were written than the cache was allocated for."""


@register_layer
class PreallocatedLayer(KVLayer):
    """``[batch, kv_heads, max_seq_len, head_dim]`` allocated once; new tokens are written in place."""

    is_sliding = False
    batch_tensors = ("_k", "_v")

    def __init__(self, max_seq_len: int, **kwargs):
        super().__init__()
        if max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
        self.max_seq_len = max_seq_len
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, dk = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self._k = torch.empty(b, h, self.max_seq_len, dk, dtype=self.dtype, device=self.device)
        self._v = torch.empty(b, h, self.max_seq_len, value_states.shape[-1], dtype=self.dtype, device=self.device)
        self.is_initialized = True
        self._refresh()

    def _refresh(self) -> None:
        self.keys = self._k[:, :, : self.length]
        self.values = self._v[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self.length + n > self.max_seq_len:
            raise CacheOverflowError(
                f"KV cache overflow: {self.length} tokens held + {n} new > max_seq_len={self.max_seq_len}; "
                "allocate a larger cache"
            )
        self._k[:, :, self.length : self.length + n] = key_states
        self._v[:, :, self.length : self.length + n] = value_states
        self.length += n
        self._refresh()
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # `update` runs before attention, so the returned keys cover held + query tokens from offset 0
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_seq_len

    def reset(self) -> None:
        self.length = 0
        if self.is_initialized:
            self._refresh()

    def _remove_last(self, n: int) -> None:
        self.length -= n
        self._refresh()

    def _apply_batch(self, fn) -> None:
        super()._apply_batch(fn)
        if self.is_initialized:
            self._refresh()

    @property
    def nbytes(self) -> int:
        """Bytes allocated (the full capacity, not just the filled part)."""
        if not self.is_initialized:
            return 0
        return self._k.numel() * self._k.element_size() + self._v.numel() * self._v.element_size()

    def export_state(self) -> LayerState:
        return LayerState.dense(self.keys.clone(), self.values.clone())

    def load_state(self, state: LayerState, total_tokens: int) -> None:
        if self.length:
            raise ValueError("the cache to import into must be empty")
        d = state.to_dense()
        if d.length != total_tokens:
            raise ValueError(
                f"a pre-allocated layer needs all {total_tokens} tokens; the state's layer holds {d.length}"
            )
        self.update(d.tensors["keys"], d.tensors["values"])


class PreallocatedCache(Cache):
    """One :class:`PreallocatedLayer` per decoder layer of ``model`` (or config)."""

    def __init__(self, model_or_config, max_seq_len: int):
        cfg = text_config(model_or_config)
        self.max_seq_len = max_seq_len
        super().__init__(layers=[PreallocatedLayer(max_seq_len) for _ in range(cfg.num_hidden_layers)])

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)
