"""Reference cache: a pre-allocated, fixed-capacity KV cache that plugs into transformers."""

from .preallocated import CacheOverflowError, PreallocatedCache, PreallocatedLayer

__all__ = ["CacheOverflowError", "PreallocatedCache", "PreallocatedLayer"]
