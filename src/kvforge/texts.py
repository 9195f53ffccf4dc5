"""Offline English text: named corpora of different styles, each with a calibration and an evaluation part.

Every source ships on the machine or installs from a package registry; none is downloaded at run time.

=========  =========================================  ==========================================
name       what                                       where it comes from (licence)
=========  =========================================  ==========================================
pydoc      CPython's help topics (technical)          ``pydoc_data.topics`` in the stdlib (PSF)
licenses   free-software licence texts (legal)        Debian ``base-files``: /usr/share/common-licenses
kjv        the King James Bible (archaic prose)       Debian ``bible-kjv`` (public domain)
fortunes   quotations, jokes, dialogue lines          Debian ``fortunes`` (BSD)
jargon     the Jargon File (hacker slang, essays)     Debian ``jargon-text`` (public domain)
=========  =========================================  ==========================================

Splits never overlap. ``pydoc`` and user files are cut by character offset (evaluation = all after the
first 20%, at a paragraph boundary; calibration = the first 20% less the paragraphs that are
near-duplicates of evaluation text). The other sources are lists of documents (licences, chapters, fortunes,
glossary entries) in a fixed order: every fifth document is calibration, the rest evaluation; the
licences are assigned by hand so that no licence family (GPL/LGPL, MPL 1/2, GFDL 1.2/1.3) straddles the
parts. ``overlap`` measures near-duplication (shared word 8-grams) between any two texts.

:data:`CALIBRATION_MIX` (pydoc, licenses, kjv) is what calibration uses by default;
:data:`HELD_OUT` (fortunes, jargon) is never used to calibrate or to choose a default, so numbers on it
show how settings carry to text kvforge was not tuned on.
"""

from __future__ import annotations

import gzip
import html
import random
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

CALIBRATION_FRACTION = 0.2
CALIBRATION_MIX = ("pydoc", "licenses", "kjv")
HELD_OUT = ("fortunes", "jargon")
SPLITS = ("calibration", "eval", "all")

LICENSES = Path("/usr/share/common-licenses")
LICENSES_CALIBRATION = ("Apache-2.0", "Artistic", "BSD", "CC0-1.0")
LICENSES_EVAL = ("GPL-3", "MPL-2.0", "GFDL-1.3")
FORTUNES = Path("/usr/share/games/fortunes")
JARGON = Path("/usr/share/doc/jargon-text/jargon.txt.gz")


class TextSourceMissing(FileNotFoundError):
    """A named corpus whose package is not installed (the message names the package)."""


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _need(path: Path, source: str, package: str) -> Path:
    if not path.exists():
        raise TextSourceMissing(f"text source {source!r} needs Debian's {package} package ({path} is missing): "
                                f"apt-get install {package}, or `make texts`")
    return path


def _licenses() -> tuple[list[str], list[str]]:
    _need(LICENSES, "licenses", "base-files")
    read = lambda names: [_need(LICENSES / n, "licenses", "base-files").read_text(encoding="utf-8") for n in names]  # noqa: E731
    return read(LICENSES_CALIBRATION), read(LICENSES_EVAL)


def _kjv() -> list[str]:
    """One document per chapter, verses joined without their references."""
    exe = shutil.which("bible")
    if exe is None:
        raise TextSourceMissing("text source 'kjv' needs Debian's bible-kjv package (its `bible` program reads "
                                "bible-kjv-text's data): apt-get install bible-kjv, or `make texts`")
    out = subprocess.run([exe, "-f", "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
    chapters: dict[str, list[str]] = {}
    for line in out.splitlines():
        m = re.match(r"(\d?[A-Za-z]+)(\d+):\d+ (.*)", line)
        if m:
            chapters.setdefault(m[1] + m[2], []).append(m[3])
    if len(chapters) < 1000:
        raise ValueError(f"text source 'kjv': `bible` printed {len(chapters)} chapters, expected 1,189")
    return [" ".join(v) for v in chapters.values()]


def _fortunes() -> list[str]:
    """Every fortune of the non-offensive set except the ASCII-art file, shuffled with a fixed seed so that
    any stretch of text mixes the categories."""
    files = sorted(p for p in _need(FORTUNES, "fortunes", "fortunes").iterdir()
                   if p.is_file() and not p.is_symlink() and p.suffix == "" and p.name != "ascii-art")
    docs = [f.strip() for p in files for f in p.read_text(encoding="utf-8", errors="replace").split("\n%\n")]
    docs = [d for d in docs if len(d) > 20]
    random.Random(0).shuffle(docs)
    return docs


def _jargon() -> list[str]:
    """The Jargon File's text (the Debian package's plain-text rendering), one document per blank-line-separated block."""
    with gzip.open(_need(JARGON, "jargon", "jargon-text"), "rt", encoding="utf-8") as f:
        text = html.unescape(f.read())
    text = re.sub(r"^[\s═─━]+$", "", text, flags=re.M)  # the box-drawing rules between sections
    blocks = [re.sub(r"[ \t]+", " ", b).strip() for b in re.split(r"\n\s*\n", text)]
    return [b for b in blocks if len(b) > 40]


DESCRIPTIONS = {
    "pydoc": "CPython's help topics: technical documentation (stdlib pydoc_data)",
    "licenses": "free-software licence texts: legal (Debian base-files)",
    "kjv": "the King James Bible: archaic narrative prose (Debian bible-kjv, public domain)",
    "fortunes": "quotations, jokes and dialogue lines (Debian fortunes)",
    "jargon": "the Jargon File: hacker slang, glossary and essays (Debian jargon-text, public domain)",
}
SOURCES = tuple(DESCRIPTIONS)


@cache
def _parts(source: str) -> tuple[str, str, str]:
    """``(calibration, eval, all)`` text of a named source (``all``: the whole text in its own order)."""
    if source == "pydoc":
        text = pydoc_text()
        return (*_char_split(text), text)
    if source == "licenses":
        cal, ev = _licenses()
        return "\n\n".join(cal), "\n\n".join(ev), "\n\n".join(cal + ev)
    docs = {"kjv": _kjv, "fortunes": _fortunes, "jargon": _jargon}[source]()
    docs = _distinct(docs)
    cal = [d for i, d in enumerate(docs) if i % 5 == 4]
    ev = [d for i, d in enumerate(docs) if i % 5 != 4]
    return "\n\n".join(cal), "\n\n".join(ev), "\n\n".join(docs)


def _distinct(docs: list[str]) -> list[str]:
    """``docs`` less every document that repeats a paragraph of an earlier one (the same fortune is filed in
    two categories, or quoted inside a longer one), so that a repeat cannot land in both parts."""
    seen: set[str] = set()
    out = []
    for doc in docs:
        paras = {" ".join(p.split()) for p in doc.split("\n\n")}
        paras = {p for p in paras if len(p) > 40} or {" ".join(doc.split())}
        if not paras & seen:
            out.append(doc)
        seen |= paras
    return out


def load_text(source: str = "pydoc", split: str = "eval") -> str:
    """Text by source name (see :data:`SOURCES`) or file path; ``split`` is ``calibration``, ``eval`` or ``all``.

    A user file is split by character offset like ``pydoc`` (see the module's docstring). Raises
    ``ValueError`` for an unknown split or an empty file, ``FileNotFoundError`` for a name that is neither
    a source nor a file, :class:`TextSourceMissing` when a source's package is not installed.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if source in SOURCES:
        return _parts(source)[SPLITS.index(split)]
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"text source {source!r}: not a named source ({', '.join(SOURCES)}) and no such file")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"text source {source!r} is empty")
    if split == "all":
        return text
    part = _char_split(text)[split == "eval"]
    if not part.strip():
        raise ValueError(f"text source {source!r}: its {split} part is empty (the calibration part is the first 20% "
                         "less the paragraphs repeated in the rest; this file's first 20% only repeats it)")
    return part


def text_names(spec: str | list[str]) -> list[str]:
    """``"pydoc,kjv"`` (or a list) -> the source names, each checked to be a source or an existing file;
    ``all`` stands for every named source, ``mix`` for :data:`CALIBRATION_MIX`, ``held-out`` for :data:`HELD_OUT`."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for item in (x.strip() for x in items):
        if not item:
            continue
        expand = {"all": SOURCES, "mix": CALIBRATION_MIX, "held-out": HELD_OUT}.get(item, (item,))
        for name in expand:
            if name not in SOURCES and not Path(name).is_file():
                raise ValueError(f"unknown text {name!r}: not a named source ({', '.join(SOURCES)}, or all, mix, "
                                 "held-out) and no such file")
            names.append(name)
    if not names:
        raise ValueError("no text given")
    return list(dict.fromkeys(names))


def calibration_text(source: str) -> str:
    """What calibrating on ``source`` reads: a named source's calibration part, or a user's file whole (a file
    given for calibration is calibration text)."""
    return load_text(source, "calibration" if source in SOURCES else "all")


def calibration_pieces(sources: str | list[str] | None = None, n: int = 8, chars: int = 2200) -> list[str]:
    """``n`` pieces of about ``chars`` characters of :func:`calibration_text` of ``sources`` (default the
    :data:`CALIBRATION_MIX`), taken in turn from each source so every source gets the same share. Raises
    ``ValueError`` when the texts are too short for ``n`` pieces."""
    names = text_names(list(CALIBRATION_MIX) if sources is None else sources)
    per = -(-n // len(names))
    pools = [text_pieces(calibration_text(s), per, chars, offset=0) for s in names]
    out = [p[i] for i in range(per) for p in pools if i < len(p)]
    if len(out) < n:
        raise ValueError(f"the calibration parts of {', '.join(names)} give {len(out)} pieces of {chars} "
                         f"characters; {n} were asked for")
    return out[:n]


def _char_split(text: str) -> tuple[str, str]:
    """``(calibration, eval)``: eval is the text after the first 20%; calibration is the paragraphs of the
    first 20% that are not near-duplicates of eval text (over 20% of their word 8-grams found there, or,
    for paragraphs under 8 words, found whole).
    Reference text repeats itself: in ``pydoc`` 41% of the first fifth's 8-grams recur in the rest."""
    cut = _split_point(text)
    head, tail = text[:cut], text[cut:]
    seen = shingles(tail)
    keep = []
    for para in head.split("\n\n"):
        grams = shingles(para)
        if (len(grams & seen) <= 0.2 * len(grams)) if grams else para.strip() not in tail:
            keep.append(para)
    return "\n\n".join(keep), tail


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


def shingles(text: str, n: int = 8) -> set[tuple[str, ...]]:
    """The set of lower-cased word ``n``-grams of ``text``."""
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def overlap(a: str, b: str, n: int = 8) -> float:
    """Share of ``a``'s word ``n``-grams that also occur in ``b`` (0 = nothing shared, 1 = ``a`` is inside ``b``)."""
    sa = shingles(a, n)
    return len(sa & shingles(b, n)) / max(1, len(sa))
