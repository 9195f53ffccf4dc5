"""One decode step for many requests, each with its own cache of its own length.

:class:`BatchedDecodeCache` is a transformers ``Cache`` *view* over the caches of ``B`` requests. The model
feeds it one new token per request (``[B, H, 1, D]`` keys and values per layer); each layer hands row
``r`` to request ``r``'s own cache layer (``layer.update``: a quantized layer quantizes, a sliding layer
trims, exactly as when the request runs alone), then left-pads the keys/values those layers return and
stacks them into ``[B, H, L, D]``. :meth:`BatchedDecodeCache.attention_mask` marks the padding, and the
caller passes per-row ``position_ids``, so each row attends to its own tokens at its own positions.

Rows keep the keys their attention needs and no more: a full-attention row the ``p + 1`` tokens it has
seen, a sliding row the last ``min(p + 1, window)``. A layer that returns more (kvforge's quantized
sliding layers keep whole key groups) is cut to that, so every layer of one attention type lines up with
one mask.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from ..models import layer_types, text_config


class _RowsLayer:
    """Layer ``index`` of the batch: updates each request's own layer and stacks what they return."""

    is_sliding = False
    is_compileable = False

    def __init__(self, batch: BatchedDecodeCache, index: int):
        self.batch = batch
        self.index = index

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """``key_states``/``value_states`` ``[B, H, 1, D]`` -> keys/values ``[B, H, L, D]``, left-padded."""
        b = self.batch
        need = b.need[b.kinds[self.index]]  # keys row r attends to, [B]
        length = max(need)
        keys = key_states.new_zeros(key_states.shape[0], key_states.shape[1], length, key_states.shape[3])
        values = value_states.new_zeros(value_states.shape[0], value_states.shape[1], length, value_states.shape[3])
        for r, cache in enumerate(b.caches):
            k, v = cache.layers[self.index].update(key_states[r : r + 1], value_states[r : r + 1], *args, **kwargs)
            if not isinstance(k, torch.Tensor):  # a quantized layer's view of its codes (fused attention path)
                k, v = k.dense()
            n = need[r]
            if k.shape[2] < n:
                raise RuntimeError(
                    f"layer {self.index} of request {r} returned {k.shape[2]} keys; its attention needs {n}"
                )
            keys[r, :, length - n :] = k[0, :, -n:]
            values[r, :, length - n :] = v[0, :, -n:]
        return keys, values


class BatchedDecodeCache(Cache):
    """A cache view for one decode step of ``len(caches)`` requests.

    ``caches``: each request's own cache (any cache whose layers implement ``update``); ``seen``: tokens
    each has already been fed (the position of its new token).
    """

    def __init__(self, model, caches: list, seen: list[int]):
        self.caches = caches
        self.seen = list(seen)
        self.kinds = layer_types(model)
        window = getattr(text_config(model), "sliding_window", None)
        self.need = {
            "full_attention": [p + 1 for p in self.seen],
            "sliding_attention": [min(p + 1, window) if window else p + 1 for p in self.seen],
        }
        super().__init__(layers=[_RowsLayer(self, i) for i in range(len(self.kinds))])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.seen)

    def attention_mask(self, dtype: torch.dtype, device=None):
        """The attention mask for this step: ``[B, 1, 1, L]`` (0 where a row attends, the dtype's minimum
        at padding), or a dict by attention type when the model mixes types."""
        masks = {}
        for kind in sorted(set(self.kinds)):
            need = torch.tensor(self.need[kind], device=device)
            length = int(need.max())
            pad = torch.arange(length, device=device)[None, :] < (length - need)[:, None]  # [B, L]
            m = torch.zeros(pad.shape, dtype=dtype, device=device).masked_fill(pad, torch.finfo(dtype).min)
            masks[kind] = m[:, None, None, :]
        if len(masks) == 1:
            return next(iter(masks.values()))
        return masks
