"""The sub-packages that register cache specs and layer encodings when imported."""

from __future__ import annotations

import importlib

CAPABILITIES = ("kvforge.cache", "kvforge.peers", "kvforge.quant", "kvforge.mla")


def load_capabilities() -> None:
    """Import every capability sub-package (each registers its specs and decoders on import)."""
    for mod in CAPABILITIES:
        try:
            importlib.import_module(mod)
        except ImportError:  # an optional capability whose dependencies are missing
            pass
