"""The built-in cache specs: transformers' ``DynamicCache``, kvforge's reference caches."""

from __future__ import annotations

from transformers import DynamicCache

from ..specs import register
from .noisy import noisy_cache
from .preallocated import PreallocatedCache


@register("dynamic", {}, "transformers DynamicCache (full precision; sliding layers keep their window)")
def _dynamic(model):
    return DynamicCache(config=model.config)


@register("preallocated", {"max_seq_len": 4096}, "kvforge's pre-allocated reference cache (fixed capacity)")
def _preallocated(model, max_seq_len):
    return PreallocatedCache(model, max_seq_len)


@register(
    "noisy",
    {"std": 0.1, "seed": 0},
    "diagnostic: a DynamicCache that adds Gaussian noise (std relative to each tensor's RMS) to stored keys and values",
    restorable=False,
)
def _noisy(model, std, seed):
    return noisy_cache(model, std, seed)
