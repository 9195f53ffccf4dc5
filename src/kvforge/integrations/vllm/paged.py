"""Reading and writing tokens' keys and values in vLLM's paged KV cache, whatever its block layout.

vLLM's attention backends lay a block out differently (the CPU backend keeps each block's keys transposed,
``[kv_heads, head_dim, block_size]``, next to its values ``[kv_heads, block_size, head_dim]``; the ISA and
the backend decide). Instead of copying one backend's layout, :func:`probe_layout` asks the backend itself:
it writes known numbers through the attention layer's own ``do_kv_cache_update`` into a one-block scratch
cache and reads where each (key or value, token, head, channel) landed. The result is a pair of index
maps, checked to be one-to-one, with which :class:`PagedKV` gathers a request's tokens from its blocks and
scatters loaded ones into them, for any layout that stores each element once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

# the largest integer each dtype holds exactly, minus one (the probe writes 1 .. base)
_EXACT = {torch.float32: 2**24 - 1, torch.float16: 2**11 - 1, torch.bfloat16: 2**8 - 1, torch.float64: 2**24 - 1}


class PagedLayoutError(RuntimeError):
    """vLLM's KV cache stores tokens in a way the connector cannot read back exactly (an fp8 cache, a layout
    that does not keep every element once)."""


@dataclass(frozen=True)
class BlockLayout:
    """Where each element of one block lives: ``key_index[t, h, d]`` and ``value_index[t, h, d]`` are
    offsets into the block's elements (``block_shape`` flattened, row-major)."""

    block_shape: tuple[int, ...]  # the cache's shape without its leading block dimension
    block_size: int  # tokens per block
    key_index: torch.Tensor  # [block_size, kv_heads, head_dim] int64
    value_index: torch.Tensor


def probe_layout(write: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None],
                 cache_shape: tuple[int, ...], dtype: torch.dtype, block_size: int, kv_heads: int,
                 head_dim: int) -> BlockLayout:
    """The element layout of a paged cache of ``cache_shape`` (``[num_blocks, ...]``), found by writing.

    ``write(key, value, scratch, slot_mapping)`` must store ``key``/``value`` (``[tokens, kv_heads,
    head_dim]``) at the slots ``slot_mapping`` of ``scratch`` (a ``[1, ...]`` cache), as the attention
    backend does when a forward pass computes new tokens. Raises :class:`PagedLayoutError` when the
    dtype holds no exact integers (fp8) or the written elements do not map one-to-one.
    """
    base = _EXACT.get(dtype)
    if base is None:
        raise PagedLayoutError(f"a {dtype} KV cache cannot be read back exactly; run vLLM with kv_cache_dtype='auto'")
    n = block_size * kv_heads * head_dim
    ids = torch.arange(2 * n, dtype=torch.int64)
    slots = torch.arange(block_size, dtype=torch.int64)
    found = torch.zeros((1, *cache_shape[1:]), dtype=torch.int64).reshape(-1)
    if found.numel() < 2 * n:
        raise PagedLayoutError(f"a block of shape {tuple(cache_shape[1:])} cannot hold {block_size} tokens of "
                               f"{kv_heads} KV heads x {head_dim} channels for keys and values")
    scale = 1
    for _ in range(max(1, math.ceil(math.log(2 * n, base)))):
        digit = (ids // scale) % base + 1  # 1..base: an element left 0 was never written
        scratch = torch.zeros((1, *cache_shape[1:]), dtype=dtype)
        kv = digit.to(dtype).reshape(2, block_size, kv_heads, head_dim)
        write(kv[0].contiguous(), kv[1].contiguous(), scratch, slots)
        got = scratch.reshape(-1).to(torch.int64)
        if ((got < 0) | (got > base)).any():
            raise PagedLayoutError("the attention backend changed the values it stored (a scaled or quantized cache)")
        found += torch.where(got > 0, (got - 1) * scale, torch.zeros_like(got))
        if scale == 1:
            written = got > 0
        scale *= base
    where = torch.full((2 * n,), -1, dtype=torch.int64)
    positions = torch.nonzero(written).reshape(-1)
    if positions.numel() != 2 * n or found[positions].unique().numel() != 2 * n:
        raise PagedLayoutError(f"the backend wrote {positions.numel()} elements for {2 * n}; cannot map its layout")
    where[found[positions]] = positions
    where = where.reshape(2, block_size, kv_heads, head_dim)
    return BlockLayout(tuple(cache_shape[1:]), block_size, where[0], where[1])


class PagedKV:
    """Gather and scatter one request's tokens in a layer's paged cache ``[num_blocks, ...]`` of
    :class:`BlockLayout` ``layout``; tokens ``start..end`` live in ``block_ids[t // block_size]``."""

    def __init__(self, layout: BlockLayout):
        self.layout = layout
        self.block_numel = math.prod(layout.block_shape)
        self._last: tuple | None = None  # the indices of the last call: every layer of a request reuses them

    def _index(self, block_ids: list[int], start: int, end: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(block_ids), start, end, str(device))
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        b = self.layout.block_size
        if end > len(block_ids) * b:
            raise ValueError(f"tokens up to {end} need {math.ceil(end / b)} blocks; the request has {len(block_ids)}")
        t = torch.arange(start, end)
        block = torch.tensor(block_ids, dtype=torch.int64)[t // b] * self.block_numel
        off = t % b
        keys = block[:, None, None] + self.layout.key_index[off]
        values = block[:, None, None] + self.layout.value_index[off]
        self._last = (key, (keys.to(device), values.to(device)))
        return self._last[1]

    def read(self, cache: torch.Tensor, block_ids: list[int], start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of tokens ``start..end``, ``[kv_heads, tokens, head_dim]`` each (copies)."""
        ki, vi = self._index(block_ids, start, end, cache.device)
        flat = cache.reshape(-1)
        return flat[ki].transpose(0, 1).contiguous(), flat[vi].transpose(0, 1).contiguous()

    def write(self, cache: torch.Tensor, block_ids: list[int], start: int, keys: torch.Tensor,
              values: torch.Tensor) -> None:
        """Store ``keys``/``values`` (``[kv_heads, tokens, head_dim]``) as tokens ``start..`` of the request."""
        if not cache.is_contiguous():
            raise PagedLayoutError("vLLM's KV cache tensor for this layer is not contiguous; cannot write into it")
        ki, vi = self._index(block_ids, start, start + keys.shape[1], cache.device)
        flat = cache.view(-1)
        flat[ki] = keys.transpose(0, 1).to(cache.dtype)
        flat[vi] = values.transpose(0, 1).to(cache.dtype)
