"""Offline text sources: the English text of ``pydoc_data.topics`` and user files.

The built-in corpus is ``"\\n\\n".join(topics[k] for k in sorted(topics))`` (CPython's own help text,
~465k characters). It is split deterministically by character offset into a calibration part (the
first 20%) and an evaluation part (the rest); the parts never overlap, so anything fitted on
calibration text is never scored on it.
"""

from __future__ import annotations

from pathlib import Path

CALIBRATION_FRACTION = 0.2


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def load_text(source: str = "pydoc", split: str = "eval") -> str:
    """Text by source name (``pydoc``) or file path; ``split`` is ``calibration``, ``eval`` or ``all``.

    A user file is split the same way as the built-in text (calibration = its first 20%).
    """
    if split not in ("calibration", "eval", "all"):
        raise ValueError(f"unknown split {split!r}; known: calibration, eval, all")
    if source == "pydoc":
        text = pydoc_text()
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"text source {source!r}: not 'pydoc' and no such file")
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(f"text source {source!r} is empty")
    if split == "all":
        return text
    cut = _split_point(text)
    return text[:cut] if split == "calibration" else text[cut:]


def _split_point(text: str) -> int:
    cut = int(len(text) * CALIBRATION_FRACTION)
    nl = text.find("\n\n", cut)  # split at a paragraph boundary when there is one nearby
    return nl if 0 <= nl < cut + 2000 else cut


def text_pieces(text: str, n: int, chars: int, offset: int = 0) -> list[str]:
    """Up to ``n`` consecutive pieces of about ``chars`` characters from ``offset``, cut at spaces."""
    out, pos = [], offset
    while len(out) < n and pos + chars < len(text):
        end = text.rfind(" ", pos, pos + chars)
        end = pos + chars if end <= pos else end
        out.append(text[pos:end])
        pos = end
    return out
