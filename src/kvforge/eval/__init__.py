"""Evaluation harness: every capability is judged by these measurements, on any cache.

    perplexity(model, tok, cache)   decode-faithful (or single-pass) perplexity
    agreement(model, tok, cache)    greedy match / first divergence / teacher-forced KL vs DynamicCache
    needle(model, tok, cache)       planted-fact retrieval per context length and depth
    qa_exact_match(model, tok, qa_set(), state_for)   passage QA from any past (own, translated, ...)
    run_bench(BenchSettings(...))   all of them for several caches into a results folder

``cache`` is a spec string (``"dynamic"``, ``"tiny-turboquant:preset=safe"``), a ``CacheSpec``, or a
callable ``model -> Cache``.
"""

from .agreement import AgreementResult, agreement, default_prompts
from .bench import BenchSettings, run_bench
from .common import cache_factory, token_windows
from .needle import NeedleResult, make_haystack, needle
from .perplexity import PerplexityResult, perplexity
from .qa import QAItem, QAResult, exact_match, qa_exact_match, qa_set

__all__ = [
    "AgreementResult",
    "BenchSettings",
    "NeedleResult",
    "PerplexityResult",
    "QAItem",
    "QAResult",
    "agreement",
    "cache_factory",
    "default_prompts",
    "exact_match",
    "make_haystack",
    "needle",
    "perplexity",
    "qa_exact_match",
    "qa_set",
    "run_bench",
    "token_windows",
]
