"""kvforge's reference caches (pre-allocated, noisy, half) and the built-in specs (the peers' caches are in
:mod:`kvforge.peers`)."""

from . import half as _half  # noqa: F401  (registers the half spec)
from . import specs as _specs  # noqa: F401  (registers dynamic, preallocated, noisy)
from .preallocated import CacheOverflowError, PreallocatedCache, PreallocatedLayer

__all__ = ["CacheOverflowError", "PreallocatedCache", "PreallocatedLayer"]
