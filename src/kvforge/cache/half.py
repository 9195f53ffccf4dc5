"""``half``: keys and values stored in 16 bits for a 32-bit model (half the bytes, attention in the model's dtype).

The smallest complete cache scheme, and the worked example of ``docs/architecture.md``: one layer class
over :class:`~kvforge.layers.KVLayer`, registered once (:func:`~kvforge.layers.register_layer` for its
``LayerState`` encoding, :func:`~kvforge.specs.register` for its spec name and settings), and one line
in ``tests/test_contract.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layers import KVLayer, KVStateError, LayerState, register_layer
from ..models import layer_types, text_config
from ..specs import register

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@register_layer
class HalfLayer(KVLayer):
    """Stores ``[batch, kv_heads, tokens, head_dim]`` keys and values in ``dtype`` (16 bits); ``update`` returns
    them in the incoming dtype. A sliding-window layer keeps the last ``sliding_window - 1`` tokens (all
    of them while transformers records the past for a rollback)."""

    kind = "half"

    def __init__(self, dtype: str = "float16", sliding_window: int | None = None):
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; choose one of {', '.join(DTYPES)}")
        self.store_dtype, self.sliding_window = dtype, sliding_window
        self.is_sliding = sliding_window is not None
        self.seen = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        store = DTYPES[self.store_dtype]
        self.keys = key_states.new_zeros(*key_states.shape[:2], 0, key_states.shape[3], dtype=store)
        self.values = value_states.new_zeros(*value_states.shape[:2], 0, value_states.shape[3], dtype=store)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[2]
        self.keys = torch.cat([self.keys, key_states.to(self.keys.dtype)], dim=2)
        self.values = torch.cat([self.values, value_states.to(self.values.dtype)], dim=2)
        out = self.keys.to(key_states.dtype), self.values.to(value_states.dtype)
        if not self.record_past:
            self._restrict()
        return out

    def _restrict(self) -> None:
        if self.sliding_window is not None and self.keys.shape[2] > self.sliding_window - 1:
            # a copy: a view would pin the whole longer buffer (nbytes would under-count what is held)
            self.keys = self.keys[:, :, -(self.sliding_window - 1) :].clone()
            self.values = self.values[:, :, -(self.sliding_window - 1) :].clone()

    def _remove_last(self, n: int) -> None:
        held = self.keys.shape[2]
        if self.sliding_window is not None and held - n < min(self.seen - n, self.sliding_window - 1):
            raise ValueError("cannot crop a sliding-window layer past the tokens it dropped; call "
                             "cache.activate_past_recording() first")
        self.keys, self.values, self.seen = self.keys[:, :, : held - n], self.values[:, :, : held - n], self.seen - n

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        held = self.keys.shape[2] if self.is_initialized else 0
        return held + query_length, self.seen - held  # asked before ``update``: the held past plus the query

    def get_max_length(self) -> int:
        return self.sliding_window if self.sliding_window is not None else -1

    @property
    def nbytes(self) -> int:
        return 0 if not self.is_initialized else sum(t.numel() * t.element_size() for t in (self.keys, self.values))

    def export_state(self) -> LayerState:
        if not self.is_initialized:
            raise KVStateError("this half layer holds no tokens yet: run a forward pass first")
        tensors = {"keys": self.keys.clone(), "values": self.values.clone()}
        return LayerState(self.kind, tensors, self.keys.shape[2], {"dtype": str(self.dtype).removeprefix("torch.")})

    def load_state(self, state: LayerState, total_tokens: int) -> None:
        if self.is_initialized and self.seen:
            raise KVStateError("the cache to import into must be empty")
        d = state if state.kind == self.kind else state.to_dense()
        keep = d.length if self.sliding_window is None else min(d.length, self.sliding_window - 1)
        if self.sliding_window is None and d.length != total_tokens:
            raise KVStateError(f"a full-attention layer needs all {total_tokens} tokens, the state holds {d.length}")
        model_dtype = getattr(torch, state.meta.get("dtype", "")) if state.kind == self.kind else d.tensors["keys"].dtype
        k, v = d.tensors["keys"][:, :, d.length - keep :], d.tensors["values"][:, :, d.length - keep :]
        self.lazy_initialization(k.to(model_dtype), v.to(model_dtype))
        self.keys, self.values = k.to(self.keys.dtype).clone(), v.to(self.values.dtype).clone()
        self.seen = total_tokens

    @staticmethod
    def decode_state(state: LayerState) -> LayerState:
        dtype = getattr(torch, state.meta["dtype"])
        return LayerState.dense(state.tensors["keys"].to(dtype), state.tensors["values"].to(dtype))


@dataclass(frozen=True)
class HalfSettings:
    """Parameters of the ``half`` spec: ``dtype`` is the storage type (``float16`` or ``bfloat16``)."""

    dtype: str = "float16"


@register("half", HalfSettings, "keys and values stored in 16 bits (float16 or bfloat16): half a float32 cache")
def build(model, dtype: str):
    from transformers.cache_utils import Cache

    window = getattr(text_config(model), "sliding_window", None)
    return Cache(layers=[HalfLayer(dtype, window if kind == "sliding_attention" else None) for kind in layer_types(model)])
