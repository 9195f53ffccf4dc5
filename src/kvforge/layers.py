"""Cache layers as data: ``LayerState``, the base class of kvforge's cache layers, and their codecs.

A transformers ``Cache`` is a list of layer objects. kvforge's own storage schemes (quantized,
pre-allocated, ...) are layer classes derived from :class:`KVLayer`, which adds to the transformers
layer API (``update``, ``get_seq_length``, ``get_mask_sizes``, ``crop``, ``reorder_cache``,
``batch_repeat_interleave``, ``batch_select_indices``, ``lazy_initialization``) what kvforge needs:

- ``export_state() -> LayerState`` and ``load_state(state, total_tokens)``: the layer's tokens as data,
  in its own encoding (bit-exact), and back;
- ``nbytes``: the bytes its tensors hold;
- ``decode_state(state) -> LayerState`` (a static method): an encoded state as dense keys and values.

Decorating a subclass with :func:`register_layer` registers its codec (``kind`` -> ``decode_state``).
Layers of other libraries are exported dense through the transformers API when that is exact
(``DynamicLayer``, ``DynamicSlidingWindowLayer``, ``StaticLayer``); a lossy peer layer (transformers'
``QuantizedLayer``, tiny-turboquant's) exports its dequantized tensors and marks the state *lossy*:
re-importing it does not continue bit-exactly, which :func:`import_layer` refuses by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers.cache_utils import (
    CacheLayerMixin,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    QuantizedLayer,
    StaticLayer,
)


class KVStateError(ValueError):
    """A KV state that cannot be used as asked (wrong model, wrong shapes, inconsistent slices)."""


@dataclass
class LayerState:
    """One layer's cached tokens.

    ``kind`` names the encoding: ``"dense"`` has ``tensors = {"keys", "values"}``, each
    ``[batch, kv_heads, length, head_dim]``. Other kinds (quantized, latent) are written and read by the
    cache layer classes that own them; ``meta`` holds their JSON-able settings (``meta["lossy"]`` names a
    peer layer whose codes could not be exported, only their dequantized values).
    """

    kind: str
    tensors: dict[str, torch.Tensor]
    length: int
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def dense(cls, keys: torch.Tensor, values: torch.Tensor, meta: dict | None = None) -> LayerState:
        if keys.dim() != 4 or values.dim() != 4 or keys.shape[:3] != values.shape[:3]:
            raise KVStateError(
                f"keys and values must be [batch, kv_heads, tokens, head_dim] with matching leading dims; "
                f"got {tuple(keys.shape)} and {tuple(values.shape)}"
            )
        return cls("dense", {"keys": keys, "values": values}, keys.shape[2], dict(meta or {}))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to_dense(self) -> LayerState:
        return self if self.kind == "dense" else decode_layer(self)

    @property
    def keys(self) -> torch.Tensor:
        return self.to_dense().tensors["keys"]

    @property
    def values(self) -> torch.Tensor:
        return self.to_dense().tensors["values"]


# ---------------------------------------------------------------------------- crop semantics
def crop_amount(argument: int, held: int) -> int:
    """How many of the last tokens ``crop(argument)`` removes from a layer that has seen ``held`` tokens.

    transformers' meaning: ``crop(-n)`` removes the last ``n``; ``crop(0)`` removes nothing (assisted and
    asynchronous decoding call it every step). ``crop(n > 0)`` is the meaning transformers gave it before
    5.24, the length to keep (5.24's ``DynamicLayer`` refuses it; kvforge's layers keep accepting it).
    Removing more than is held raises ``ValueError`` (nothing is silently emptied).
    """
    if argument > 0:
        return max(0, held - argument)
    if -argument > held:
        raise ValueError(f"cannot crop {-argument} tokens (crop({argument})): the layer holds only {held}")
    return -argument


# ---------------------------------------------------------------------------- the layer base class
class KVLayer(CacheLayerMixin):
    """Base of kvforge's cache layer classes (see the module docstring for the contract).

    Subclasses set ``kind`` (the ``LayerState`` encoding they export) and ``batch_tensors``, and implement
    the transformers layer API plus ``export_state``, ``load_state``, ``nbytes`` and, for ``kind != "dense"``,
    ``decode_state``. ``crop`` and the batch operations of beam search are implemented here once:
    subclasses implement ``_remove_last(n)`` (and ``_restrict()`` if they drop old tokens).
    """

    kind: ClassVar[str] = "dense"
    is_compileable = False
    is_croppable = True
    record_past = False  # transformers' switch for rollback (assisted decoding): keep what a window would drop
    batch_tensors: ClassVar[tuple[str, ...]] = ("keys", "values")  # the tensors whose dim 0 is the batch

    def activate_past_recording(self, **kwargs) -> None:
        """Keep tokens a sliding window would drop until the next ``crop`` (transformers calls this before
        assisted decoding, which crops rejected draft tokens). Keyword arguments for recurrent layers
        (``recurrent_states_to_keep``, transformers >= 5.25) do not apply to a KV cache and are ignored."""
        self.record_past = True

    def crop(self, tokens_to_remove: int) -> None:
        if not self.is_initialized:
            return
        n = crop_amount(tokens_to_remove, self.get_seq_length())
        if n:
            self._remove_last(n)
        self._restrict()

    def _remove_last(self, n: int) -> None:
        raise NotImplementedError

    def _restrict(self) -> None:
        """After a ``crop``: drop what the layer no longer needs (a sliding window's old tokens)."""

    def _apply_batch(self, fn) -> None:
        if self.is_initialized:
            for name in self.batch_tensors:
                setattr(self, name, fn(getattr(self, name)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``i`` becomes row ``beam_idx[i]``."""
        self._apply_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply_batch(lambda t: t[indices, ...])

    def export_state(self) -> LayerState:
        raise NotImplementedError

    def load_state(self, state: LayerState, total_tokens: int) -> None:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        raise NotImplementedError

    @staticmethod
    def decode_state(state: LayerState) -> LayerState:
        raise KVStateError(f"no decoder for layer encoding {state.kind!r}")


# ---------------------------------------------------------------------------- codecs
LAYER_CLASSES: dict[str, type] = {}  # encoding kind -> the KVLayer class that owns it


def register_layer(cls: type) -> type:
    """Class decorator: register a :class:`KVLayer` subclass as the owner of its ``kind`` (its codec)."""
    owner = LAYER_CLASSES.get(cls.kind)
    if cls.kind != "dense" and owner is not None and owner.__qualname__ != cls.__qualname__:
        raise ValueError(f"layer encoding {cls.kind!r} is already registered by {owner.__name__}")
    if cls.kind != "dense":
        LAYER_CLASSES[cls.kind] = cls
    return cls


def decode_layer(layer: LayerState) -> LayerState:
    """An encoded layer as dense keys and values (its class must be registered: import its capability)."""
    if layer.kind not in LAYER_CLASSES:
        from ._capabilities import load_capabilities  # capabilities register their layer classes on import

        load_capabilities()
    if layer.kind not in LAYER_CLASSES:
        raise KVStateError(f"unknown layer encoding {layer.kind!r}; known: dense, {', '.join(LAYER_CLASSES) or 'none'}")
    return LAYER_CLASSES[layer.kind].decode_state(layer)


def _is_lossy_peer(layer) -> bool:
    return isinstance(layer, QuantizedLayer) or hasattr(layer, "_materialize_full")


def dense_kv(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values a cache layer holds, ``[batch, kv_heads, tokens, head_dim]`` each (dequantized
    for quantized layers). Raises :class:`KVStateError` for an empty or unknown layer."""
    if hasattr(layer, "export_state"):
        d = layer.export_state().to_dense()
        return d.tensors["keys"], d.tensors["values"]
    if not getattr(layer, "is_initialized", False) or layer.keys is None:
        raise KVStateError(f"{type(layer).__name__} holds no tokens yet: run a forward pass first")
    if isinstance(layer, QuantizedLayer):  # transformers': quantized past + a full-precision residual
        parts_k, parts_v = [], []
        if getattr(layer, "_quantized_keys", None) is not None:
            parts_k.append(layer._dequantize(layer._quantized_keys))
            parts_v.append(layer._dequantize(layer._quantized_values))
        if layer.keys.dim() == 4:  # after quantizing everything it holds a 1-D empty tensor
            parts_k.append(layer.keys)
            parts_v.append(layer.values)
        k, v = torch.cat(parts_k, dim=-2), torch.cat(parts_v, dim=-2)
        if k.shape[-2] != layer.get_seq_length():
            raise KVStateError(f"QuantizedLayer returned {k.shape[-2]} tokens for {layer.get_seq_length()}")
        return k, v
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
    """A cache layer's tokens as a ``LayerState`` (its own encoding, or dense; lossy peers are marked)."""
    if hasattr(layer, "export_state"):
        return layer.export_state()
    k, v = dense_kv(layer)
    meta = {"lossy": type(layer).__name__} if _is_lossy_peer(layer) else None
    return LayerState.dense(k.detach().clone(), v.detach().clone(), meta)


def can_restore(layer) -> bool:
    """Whether a state exported from ``layer`` imports back into an empty layer of its type exactly."""
    return hasattr(layer, "load_state") or not _is_lossy_peer(layer)


def import_layer(layer, state: LayerState, total_tokens: int, device) -> None:
    """Put a layer's state into an empty cache layer.

    Raises :class:`KVStateError` when the layer is not empty, when a full-attention layer would get fewer
    than ``total_tokens`` tokens, and for a peer's lossy layer (transformers' ``QuantizedLayer``,
    tiny-turboquant's): importing re-quantizes and would not continue as the exported cache did.
    """
    if getattr(layer, "get_seq_length", lambda: 0)() > 0:
        raise KVStateError("the cache to import into must be empty")
    if hasattr(layer, "load_state"):
        layer.load_state(state, total_tokens)
        return
    if _is_lossy_peer(layer):
        raise KVStateError(
            f"cannot import a KV state into a {type(layer).__name__} layer: it would re-quantize the tokens and "
            "not continue as the exported cache did; import into 'dynamic' or 'kvforge-quant' instead"
        )
    d = state.to_dense()
    k = d.tensors["keys"].to(device)
    v = d.tensors["values"].to(device)
    if isinstance(layer, DynamicSlidingWindowLayer):
        keep = layer.sliding_window - 1
        layer.update(k[:, :, -keep:], v[:, :, -keep:])  # update copies (torch.cat)
        layer.cumulative_length = total_tokens  # tokens seen, not tokens kept
        return
    if d.length != total_tokens:
        raise KVStateError(f"a full-attention layer needs all {total_tokens} tokens, the state holds {d.length}")
    layer.update(k, v)  # update copies (torch.cat)
