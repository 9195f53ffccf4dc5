"""kvforge's reference caches (pre-allocated, noisy), the built-in specs, and the peers' caches behind spec names."""

from . import half as _half  # noqa: F401  (registers the half spec)
from . import peers as _peers  # noqa: F401  (registers the peers' specs)
from . import specs as _specs  # noqa: F401  (registers dynamic, preallocated, noisy)
from .preallocated import CacheOverflowError, PreallocatedCache, PreallocatedLayer

__all__ = ["CacheOverflowError", "PreallocatedCache", "PreallocatedLayer"]
