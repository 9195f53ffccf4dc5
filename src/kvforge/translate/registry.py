"""Translators shipped with kvforge, loaded by model pair."""

from __future__ import annotations

from pathlib import Path

from .translator import Translator

WEIGHTS = Path(__file__).parent / "weights"


def shipped() -> list[tuple[str, str]]:
    """The (source, target) pairs whose fitted translators ship in the package."""
    return sorted(tuple(p.stem.split("__")) for p in WEIGHTS.glob("*__*.safetensors"))


def load(source: str, target: str, source_model=None, target_model=None) -> Translator:
    """The shipped translator for ``source -> target``. With the models given, checks they are the pair
    it was fitted for (:class:`TranslatorMismatchError` otherwise). A same-model pair is the identity."""
    from .translator import identity

    if source == target:
        if source_model is None:
            raise ValueError("a same-model translator needs the model (load(name, name, model, model))")
        return identity(source_model, source)
    path = WEIGHTS / f"{source}__{target}.safetensors"
    if not path.exists():
        pairs = ", ".join(f"{s} -> {t}" for s, t in shipped()) or "none"
        raise ValueError(f"no shipped translator for {source} -> {target}; shipped: {pairs} "
                         "(fit one with `kvforge translate fit`)")
    tr = Translator.load(path)
    if source_model is not None and target_model is not None:
        tr.check_pair(source_model, target_model)
    return tr
