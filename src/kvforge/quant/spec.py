"""The ``kvforge-quant`` cache spec (``kvforge eval/bench --cache kvforge-quant:preset=safe``)."""

from __future__ import annotations

from ..specs import register
from .config import PRESET_HELP


@register(
    "kvforge-quant",
    {"preset": "", "key_bits": None, "value_bits": None, "key_group": None, "value_group": None,
     "residual": None, "rotate": "", "clip": "", "protect_first": 0, "protect_last": 0, "fused": "auto"},
    "kvforge's KIVI-layout quantized cache: presets "
    + ", ".join(f"{k} ({v})" for k, v in PRESET_HELP.items())
    + "; or key_bits/value_bits in 2,3,4,8; rotate=none|keys|both; fused=auto|on|off",
)
def build(model, preset, key_bits, value_bits, key_group, value_group, residual, rotate, clip, protect_first,
          protect_last, fused):
    from .cache import QuantizedKVCache

    fused_arg = {"auto": None, "on": True, "off": False, True: True, False: False}.get(fused, "bad")
    if fused_arg == "bad":
        raise ValueError(f"fused={fused!r}; choose auto, on or off")
    return QuantizedKVCache.for_model(
        model, preset or None, key_bits=key_bits, value_bits=value_bits, key_group=key_group, value_group=value_group,
        residual_length=residual, rotate=rotate or None,
        clip={"": None, "on": True, "true": True, "off": False, "false": False}[str(clip).lower()], protect_first=protect_first, protect_last=protect_last,
        fused=fused_arg)
