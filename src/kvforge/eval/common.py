"""Shared plumbing for the metrics: naming the cache under test and cutting token windows."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..specs import CacheSpec, parse_spec

CacheLike = str | CacheSpec | Callable[[Any], Any]


def cache_factory(cache: CacheLike) -> tuple[str, Callable[[Any], Any]]:
    """``(label, factory)`` for a spec string, a :class:`CacheSpec` or a ``model -> Cache`` callable.

    Every metric builds a fresh cache per window / prompt through the factory, so any cache works:
    kvforge's, transformers' own, or a peer library's.
    """
    if isinstance(cache, str | CacheSpec):
        spec = parse_spec(cache)
        return str(spec), spec.build
    if callable(cache):
        return getattr(cache, "__name__", "custom"), cache
    raise TypeError(f"expected a cache spec or a callable model -> Cache, got {type(cache).__name__}")


def token_windows(tokenizer, text: str, n_windows: int, window: int, stride: int | None = None) -> list[torch.Tensor]:
    """``n_windows`` consecutive windows of ``window`` token ids (``[1, window]`` each) from ``text``.

    The text is tokenized once (with the tokenizer's special tokens, as a user's prompt would be), and
    window ``i`` is ``ids[i * stride : i * stride + window]``. Too little text is an error, never a
    silently smaller run.
    """
    stride = stride or window
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    need = (n_windows - 1) * stride + window
    if ids.numel() < need:
        raise ValueError(
            f"the text has {ids.numel()} tokens; {n_windows} windows of {window} (stride {stride}) need {need}"
        )
    return [ids[i * stride : i * stride + window][None] for i in range(n_windows)]


def model_device(model) -> torch.device:
    return next(model.parameters()).device
