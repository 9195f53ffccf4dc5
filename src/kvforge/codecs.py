"""Moving one layer's tokens between transformers cache layers and ``LayerState``.

Cache layer classes that own an encoding (kvforge's quantized and pre-allocated layers) implement
``export_state() -> LayerState`` and ``load_state(state, total_tokens)``, and register a decoder for their
``kind`` with :func:`register_decoder`; every other layer is read and written dense through the
transformers layer API.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, QuantizedLayer, StaticLayer

from .state import KVStateError, LayerState

_DECODERS: dict[str, Callable[[LayerState], LayerState]] = {}


def register_decoder(kind: str, fn: Callable[[LayerState], LayerState]) -> None:
    """Register how a layer encoding ``kind`` becomes dense keys and values."""
    _DECODERS[kind] = fn


def decode_layer(layer: LayerState) -> LayerState:
    if layer.kind not in _DECODERS:
        _load_known_decoders()
    try:
        return _DECODERS[layer.kind](layer)
    except KeyError:
        raise KVStateError(f"unknown layer encoding {layer.kind!r}; known: dense, {', '.join(_DECODERS)}") from None


def _load_known_decoders() -> None:
    from ._capabilities import load_capabilities

    load_capabilities()


def dense_kv(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values a transformers cache layer holds, ``[batch, kv_heads, tokens, head_dim]`` each."""
    if hasattr(layer, "export_state"):
        d = layer.export_state().to_dense()
        return d.tensors["keys"], d.tensors["values"]
    if not getattr(layer, "is_initialized", False) or layer.keys is None:
        raise KVStateError(f"{type(layer).__name__} holds no tokens yet: run a forward pass first")
    if isinstance(layer, QuantizedLayer):
        past = layer.keys.shape[-2] if layer.keys is not None else 0
        if layer.cumulative_length > past:
            k = torch.cat([layer._dequantize(layer._quantized_keys), layer.keys], dim=-2)
            v = torch.cat([layer._dequantize(layer._quantized_values), layer.values], dim=-2)
            return k, v
        return layer.keys, layer.values
    if isinstance(layer, StaticLayer):
        if getattr(layer, "is_sliding", False):
            raise KVStateError("exporting a static sliding-window cache is not supported; use a DynamicCache")
        n = int(layer.cumulative_length)
        return layer.keys[:, :, :n], layer.values[:, :, :n]
    if hasattr(layer, "_materialize_full"):  # tiny-turboquant's TinyKVLayer (its codes are not a public API)
        try:
            k, v = layer._materialize_full()
        except Exception as e:  # noqa: BLE001 - a peer's internals; say what failed
            raise KVStateError(f"cannot export a {type(layer).__name__} layer: {e}") from e
        if k.shape[-2] != layer.get_seq_length():
            raise KVStateError(f"{type(layer).__name__} returned {k.shape[-2]} tokens for {layer.get_seq_length()}")
        return k, v
    if isinstance(layer, DynamicLayer):
        return layer.keys, layer.values
    raise KVStateError(f"cannot export a cache layer of type {type(layer).__name__}")


def export_layer(layer) -> LayerState:
    if hasattr(layer, "export_state"):
        return layer.export_state()
    k, v = dense_kv(layer)
    return LayerState.dense(k.detach().clone(), v.detach().clone())


def import_layer(layer, state: LayerState, total_tokens: int, device) -> None:
    """Put a layer's state into an empty transformers cache layer."""
    if getattr(layer, "get_seq_length", lambda: 0)() > 0:
        raise KVStateError("the cache to import into must be empty")
    if hasattr(layer, "load_state"):
        layer.load_state(state, total_tokens)
        return
    d = state.to_dense()
    k = d.tensors["keys"].to(device)
    v = d.tensors["values"].to(device)
    if isinstance(layer, DynamicSlidingWindowLayer):
        keep = layer.sliding_window - 1
        k, v = k[:, :, -keep:], v[:, :, -keep:]
        layer.update(k, v)  # update copies (torch.cat)
        layer.cumulative_length = total_tokens  # tokens seen, not tokens kept
        return
    if d.length != total_tokens:
        raise KVStateError(f"a full-attention layer needs all {total_tokens} tokens, the state holds {d.length}")
    layer.update(k, v)  # update copies (torch.cat)
