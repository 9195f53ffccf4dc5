"""The ``kvforge-quant`` cache spec (``kvforge eval/bench --cache kvforge-quant:preset=safe``).

Its parameters are the fields of :class:`QuantSpec`: a preset, an override for each
:class:`~kvforge.quant.config.QuantConfig` field (generated from that dataclass, so a quantization setting
is declared once, there), the layers kept in full precision, and the attention path.
"""

from __future__ import annotations

from dataclasses import field, fields, make_dataclass

from ..specs import register
from .config import PRESET_HELP, QuantConfig

ALIASES = {"residual": "residual_length"}  # spec parameter -> QuantConfig field

QuantSpec = make_dataclass(
    "QuantSpec",
    [("preset", str, field(default="")),
     *[(next((a for a, n in ALIASES.items() if n == f.name), f.name), f.type, field(default=None))
       for f in fields(QuantConfig)],
     ("protect_first", int, field(default=0)), ("protect_last", int, field(default=0)),
     ("fused", str, field(default="auto"))],
    frozen=True,
)
QuantSpec.__doc__ = ("Parameters of the kvforge-quant spec: preset, any QuantConfig field (None keeps the preset's; "
                     "residual = residual_length), protect_first/protect_last layers, fused=auto|on|off.")

_SWITCH = {"": None, "auto": None, "on": True, "true": True, "1": True, "off": False, "false": False, "0": False}


def _switch(name: str, value):
    if isinstance(value, bool) or value is None:
        return value
    try:
        return _SWITCH[str(value).lower()]
    except KeyError:
        raise ValueError(f"{name}={value!r}; choose auto, on or off") from None


def check(preset, protect_first, protect_last, fused, **overrides) -> None:
    """What :func:`build` would refuse, refused when the spec is parsed (an unknown or removed preset, a
    preset with explicit bits, impossible groups): the same ``ValueError`` messages."""
    from .config import resolve_config

    _switch("fused", fused)
    resolve_config(preset or None, default_preset="safe", **{ALIASES.get(k, k): v for k, v in overrides.items()})


@register(
    "kvforge-quant",
    QuantSpec,
    "kvforge's KIVI-layout quantized cache: presets "
    + ", ".join(f"{k} ({v})" for k, v in PRESET_HELP.items())
    + "; or key_bits/value_bits in 2,3,4,8; rotate=none|keys|both; fused=auto|on|off",
    check=check,
)
def build(model, preset, protect_first, protect_last, fused, **overrides):
    from .cache import QuantizedKVCache

    config = {ALIASES.get(k, k): v for k, v in overrides.items()}
    return QuantizedKVCache.for_model(model, preset or None, protect_first=protect_first, protect_last=protect_last,
                                      fused=_switch("fused", fused), **config)
