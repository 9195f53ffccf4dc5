"""Translators shipped with kvforge, loaded by model pair (and mode)."""

from __future__ import annotations

from pathlib import Path

from .modes import TranslationMode, get_mode
from .translator import Translator

WEIGHTS = Path(__file__).parent / "weights"


def weights_path(source: str, target: str, mode: str | TranslationMode = "replace") -> Path:
    return WEIGHTS / f"{source}__{target}{get_mode(mode).suffix}.safetensors"


def shipped(mode: str | TranslationMode = "replace") -> list[tuple[str, str]]:
    """The (source, target) pairs whose trained translators of ``mode`` ship in the package."""
    suffix = get_mode(mode).suffix
    out = []
    for p in WEIGHTS.glob("*__*.safetensors"):
        parts = p.stem.split("__")
        if len(parts) in (2, 3) and "".join(f"__{x}" for x in parts[2:]) == suffix:
            out.append((parts[0], parts[1]))
    return sorted(out)


def load(source: str, target: str, source_model=None, target_model=None,
         mode: str | TranslationMode = "replace") -> Translator:
    """The shipped translator for ``source -> target`` in ``mode`` (``replace`` or ``fuse``). With the models
    given, checks they are the pair it was trained for (:class:`TranslatorMismatchError` otherwise). A
    same-model pair is the identity."""
    from .translator import identity

    mode = get_mode(mode)
    if source == target:
        if source_model is None:
            raise ValueError("a same-model translator needs the model (load(name, name, model, model))")
        return identity(source_model, source)
    path = weights_path(source, target, mode)
    if not path.exists():
        pairs = ", ".join(f"{s} -> {t}" for s, t in shipped(mode)) or "none"
        raise ValueError(f"no shipped {mode.name} translator for {source} -> {target}; shipped: {pairs} "
                         "(train one with `kvforge translate train`)")
    tr = Translator.load(path)
    if source_model is not None and target_model is not None:
        tr.check_pair(source_model, target_model)
    return tr
