"""Peers' caches behind kvforge's spec names: transformers' ``QuantizedCache`` and tiny-turboquant.

Each adapter is the peer's own cache class with only what kvforge needs changed: the ``kwargs=`` keyword
of transformers >= 5.24, and a clear refusal, naming the spec, of what the peer cannot do correctly
(both drop or mangle tokens on ``crop``; tiny-turboquant's layers cannot reorder a batch for beam search).
``crop(0)`` (nothing to remove) is always allowed. Neither can be restored from an exported state:
their codes are not public, so an export holds dequantized values (see :mod:`kvforge.layers`).
"""

from __future__ import annotations

from ..specs import register


def _refuse_crop(spec: str, tokens_to_remove: int) -> None:
    if tokens_to_remove != 0:
        raise ValueError(f"cache spec {spec}: this cache cannot be cropped (crop({tokens_to_remove})); it would lose "
                         "or keep the wrong tokens. Use 'dynamic' or 'kvforge-quant' for assisted decoding")


def _refuse_batch(spec: str):
    def refuse(self, *args, **kwargs):
        raise ValueError(f"cache spec {spec}: its layers cannot reorder or select batch rows (beam search, "
                         "batch_select_indices); use 'dynamic' or 'kvforge-quant'")

    return refuse


@register(
    "hf-quantized",
    {"backend": "quanto", "nbits": 4, "q_group_size": 64, "residual_length": 128},
    "transformers' QuantizedCache (quanto or hqq backend; full-attention models only)",
    requires=("optimum.quanto",),
    hint="pip install optimum-quanto",
    restorable=False,
)
def _hf_quantized(model, backend, nbits, q_group_size, residual_length):
    from transformers import QuantizedCache

    class HFQuantizedCache(QuantizedCache):
        """transformers' QuantizedCache; ``crop`` and batch reordering are refused by name (its layers crop only
        the residual, and cannot reorder once everything is quantized)."""

        def crop(self, tokens_to_remove: int) -> None:
            _refuse_crop("hf-quantized", tokens_to_remove)

        reorder_cache = batch_repeat_interleave = batch_select_indices = _refuse_batch("hf-quantized")

    return HFQuantizedCache(
        backend, model.config, nbits=nbits, q_group_size=q_group_size, residual_length=residual_length
    )


@register(
    "tiny-turboquant",
    {"preset": "safe", "key_bits": 0, "value_bits": 0},
    "peer: tiny-turboquant's TinyKVCache (KIVI-style; presets safe, balanced, compact, aggressive)",
    requires=("tiny_turboquant",),
    hint="pip install 'kvforge[peers]'",
    restorable=False,
)
def _tiny_turboquant(model, preset, key_bits, value_bits):
    from tiny_turboquant import TinyKVCache

    class TinyKVCacheCompat(TinyKVCache):
        """TinyKVCache that also takes the ``kwargs=`` keyword transformers >= 5.24 passes to ``update``
        (tiny-turboquant 0.18 only knows the positional ``cache_kwargs``), and refuses by name what its
        layers cannot do: ``crop`` and the batch reordering of beam search."""

        def update(self, key_states, value_states, layer_idx, cache_kwargs=None, **kwargs):
            if cache_kwargs is None:
                cache_kwargs = kwargs.get("kwargs") or kwargs.get("cache_kwargs")
            return super().update(key_states, value_states, layer_idx, cache_kwargs)

        def crop(self, tokens_to_remove: int) -> None:
            _refuse_crop("tiny-turboquant", tokens_to_remove)

        reorder_cache = batch_repeat_interleave = batch_select_indices = _refuse_batch("tiny-turboquant")

    from ..models import layer_types

    if "sliding_attention" in layer_types(model):
        raise ValueError("cache spec tiny-turboquant: refused for a model with sliding-window layers, whose tokens "
                         "it keeps beyond the window (memory grows without bound); use 'kvforge-quant'")
    if key_bits or value_bits:
        return TinyKVCacheCompat.for_model(model, key_bits=key_bits or 4, value_bits=value_bits or 4)
    return TinyKVCacheCompat.for_model(model, compression=preset)
