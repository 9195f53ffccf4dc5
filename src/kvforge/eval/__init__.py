"""Evaluation harness: every capability is judged by these measurements, on any cache.

    perplexity(model, tok, cache)   decode-faithful (or single-pass) perplexity
    agreement(model, tok, cache)    greedy match / first divergence / teacher-forced KL vs DynamicCache
    needle(model, tok, cache)       planted-fact retrieval per context length and depth
    run_bench(BenchSettings(...))   all of them for several caches into a results folder

``cache`` is a spec string (``"dynamic"``, ``"tiny-turboquant:preset=safe"``), a ``CacheSpec``, or a
callable ``model -> Cache``.
"""

from .agreement import AgreementResult, agreement, default_prompts
from .bench import BenchSettings, run_bench
from .common import cache_factory, token_windows
from .needle import NeedleResult, make_haystack, needle
from .perplexity import PerplexityResult, perplexity

__all__ = [
    "AgreementResult",
    "BenchSettings",
    "NeedleResult",
    "PerplexityResult",
    "agreement",
    "cache_factory",
    "default_prompts",
    "make_haystack",
    "needle",
    "perplexity",
    "run_bench",
    "token_windows",
]
