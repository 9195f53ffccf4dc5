"""Low-bit quantized KV cache (KIVI layout, bit-packed, rotations, attention on the codes).

    from kvforge.quant import QuantizedKVCache
    cache = QuantizedKVCache.for_model(model, "safe")
    model.generate(**inputs, cache=cache)   # past_key_values= on transformers < 5.24
"""

from . import spec as _spec  # noqa: F401  (registers the "kvforge-quant" cache spec)
from .cache import QuantizedKVCache
from .config import PRESET_HELP, PRESETS, QuantConfig, resolve_config
from .layer import KIND, QuantizedLayer, QuantizedView

__all__ = ["KIND", "PRESETS", "PRESET_HELP", "QuantConfig", "QuantizedKVCache", "QuantizedLayer", "QuantizedView", "resolve_config"]
