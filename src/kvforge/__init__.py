"""kvforge: the KV cache of Hugging Face causal LMs as first-class data.

Public API::

    load_model, BUNDLED, fingerprint          models
    KVState, LayerState, prefill              the KV cache as data
    generate, GenerationResult                reference generation loop
    PreallocatedCache, PreallocatedLayer      reference pre-allocated cache
    CacheSpec, build_cache, cache_nbytes      one way to name a cache (see kvforge.specs)

Capabilities live in sub-packages (``kvforge.quant``, ``kvforge.translate``, ``kvforge.mla``, ``kvforge.eval``,
and ``kvforge.serve``: the OpenAI-compatible server, ``kvforge serve``, extra ``serve``).
"""

from .cache import CacheOverflowError, PreallocatedCache, PreallocatedLayer
from .generate import GenerationResult, generate, prefill
from .models import BUNDLED, ModelNotFoundError, fingerprint, load_model
from .specs import CacheSpec, UnknownCacheSpecError, build_cache, cache_nbytes, known_specs, parse_spec
from .state import KVFileError, KVState, KVStateError, LayerState, ModelMismatchError

__version__ = "0.1.0"

__all__ = [
    "BUNDLED",
    "CacheOverflowError",
    "CacheSpec",
    "GenerationResult",
    "KVFileError",
    "KVState",
    "KVStateError",
    "LayerState",
    "ModelMismatchError",
    "ModelNotFoundError",
    "PreallocatedCache",
    "PreallocatedLayer",
    "UnknownCacheSpecError",
    "build_cache",
    "cache_nbytes",
    "fingerprint",
    "generate",
    "known_specs",
    "load_model",
    "parse_spec",
    "prefill",
]
