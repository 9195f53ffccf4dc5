"""Shared plumbing for the metrics: naming the cache under test and cutting token windows.

Both live in :mod:`kvforge.run` (the one way kvforge runs a model through a cache); they are
re-exported here for the metrics and for users of ``kvforge.eval``.
"""

from __future__ import annotations

from ..run import CacheLike, cache_factory, model_device, token_windows

__all__ = ["CacheLike", "cache_factory", "model_device", "token_windows"]
