"""One forward pass for many requests, each with its own cache of its own length.

:class:`BatchedCache` is a transformers ``Cache`` *view* over the caches of ``B`` requests. Row ``r`` feeds
``new[r]`` tokens (one when decoding, a prompt chunk when prefilling), left-padded to the longest row. Each
layer hands row ``r``'s real keys/values to request ``r``'s own cache layer (``layer.update``: a quantized
layer quantizes, a sliding layer trims, exactly as when the request runs alone), then left-pads what those
layers return and stacks it into ``[B, H, L, D]``. :meth:`BatchedCache.attention_mask` marks padding,
causality and sliding windows per row, and :meth:`BatchedCache.inputs` gives the padded ids and per-row
positions, so each row attends to its own tokens at its own positions.

A row keeps the keys its attention needs and no more: a full-attention row the ``p + q`` tokens it has
seen, a sliding row the last ``min(p, window - 1) + q``. A layer that returns more (kvforge's quantized
sliding layers keep whole key groups) is cut to that, so every layer of one attention type lines up with
one mask.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from .. import run
from ..models import layer_types, text_config


class _RowsLayer:
    """Layer ``index`` of the batch: updates each request's own layer and stacks what they return.

    It holds what it needs (the requests' caches, how many new tokens each feeds, how many keys each
    attends to), not the :class:`BatchedCache`: a layer pointing back at its cache would make a reference
    cycle per pass, and the request caches it holds would then live until Python's cyclic collector ran
    (measured: a server's resident memory grew by about 700 MiB per 300 requests that way).
    """

    is_sliding = False
    is_compileable = False

    def __init__(self, caches: list, new: list[int], need: list[int], index: int):
        self.caches, self.new, self.need, self.index = caches, new, need, index

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """``key_states``/``value_states`` ``[B, H, Q, D]`` (left-padded) -> ``[B, H, L, D]``, left-padded."""
        need = self.need  # keys row r attends to, [B]
        length = max(need)
        q = key_states.shape[2]
        shape = (key_states.shape[0], key_states.shape[1], length, key_states.shape[3])
        outs = []
        for r, cache in enumerate(self.caches):
            first = q - self.new[r]
            k, v = cache.layers[self.index].update(key_states[r : r + 1, :, first:], value_states[r : r + 1, :, first:],
                                                   *args, **kwargs)
            if k.shape[2] < need[r]:
                raise RuntimeError(
                    f"layer {self.index} of request {r} returned {k.shape[2]} keys; its attention needs {need[r]}"
                )
            outs.append((k, v))
        if q == 1 and all(hasattr(k, "rows") for k, _ in outs):
            # quantized layers' views of their codes: a decode step attends on the codes of each row where they
            # lie (kvforge's attention), no padded full-precision copy
            rows = outs[0][0].rows([k for k, _ in outs], need)
            return rows, rows
        keys, values = key_states.new_zeros(shape), value_states.new_zeros(shape)
        for r, (k, v) in enumerate(outs):
            if not isinstance(k, torch.Tensor):  # a quantized layer's view of its codes (fused attention path)
                k, v = k.dense()
            n = need[r]
            keys[r, :, length - n :] = k[0, :, -n:]
            values[r, :, length - n :] = v[0, :, -n:]
        return keys, values


class BatchedCache(Cache):
    """A cache view for one forward pass of ``len(caches)`` requests.

    ``caches``: each request's own cache (any cache whose layers implement ``update``); ``seen``: tokens
    each has already been fed; ``new``: tokens each feeds now (default one: a decode step).
    """

    def __init__(self, model, caches: list, seen: list[int], new: list[int] | None = None):
        self.caches = caches
        self.seen = list(seen)
        self.new = list(new) if new is not None else [1] * len(caches)
        self.kinds = layer_types(model)
        self.window = getattr(text_config(model), "sliding_window", None)
        w = self.window
        self.need = {
            "full_attention": [p + q for p, q in zip(self.seen, self.new)],
            "sliding_attention": [min(p, w - 1) + q if w else p + q for p, q in zip(self.seen, self.new)],
        }
        super().__init__(layers=[_RowsLayer(self.caches, self.new, self.need[kind], i) for i, kind in enumerate(self.kinds)])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.seen)

    def inputs(self, token_ids: list[list[int]], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` and ``position_ids`` ``[B, Q]`` for each row's new tokens, left-padded."""
        q = max(self.new)
        ids = torch.zeros(len(token_ids), q, dtype=torch.long)
        for r, (toks, n) in enumerate(zip(token_ids, self.new)):
            ids[r, q - n :] = torch.tensor(toks[-n:])
        return ids.to(device), run.row_positions(self.seen, self.new, device)

    def attention_mask(self, dtype: torch.dtype, device=None):
        """The attention mask for this pass: ``[B, 1, Q, L]`` (0 where a row's query attends, the dtype's
        minimum elsewhere), or a dict by attention type when the model mixes types."""
        q = max(self.new)
        seen = torch.tensor(self.seen)[:, None, None]
        new = torch.tensor(self.new)[:, None, None]
        q_abs = seen + new - q + torch.arange(q)[None, :, None]  # [B, Q, 1], absolute position of each query
        q_real = torch.arange(q)[None, :, None] >= q - new
        masks = {}
        for kind in sorted(set(self.kinds)):
            need = torch.tensor(self.need[kind])[:, None, None]
            length = int(need.max())
            k_abs = seen + new - length + torch.arange(length)[None, None, :]  # [B, 1, L]
            k_real = torch.arange(length)[None, None, :] >= length - need
            allowed = k_real & (k_abs <= q_abs)
            if kind == "sliding_attention" and self.window:
                allowed &= q_abs - k_abs < self.window
            allowed |= k_real & ~q_real  # padding queries look at something (no empty softmax rows)
            m = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
            masks[kind] = m[:, None].to(device)
        if len(masks) == 1:
            return next(iter(masks.values()))
        return masks


BatchedDecodeCache = BatchedCache  # the name for its most frequent use: one new token per request
