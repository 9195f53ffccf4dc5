"""Progress reporting shared by the library and the CLI (quiet when ``KVFORGE_QUIET=1``)."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from tqdm.auto import tqdm


def quiet() -> bool:
    return os.environ.get("KVFORGE_QUIET", "") not in ("", "0")


def progress(iterable=None, **kwargs):
    """A tqdm progress bar on stderr, disabled when quiet."""
    kwargs["disable"] = bool(kwargs.get("disable")) or quiet()
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, **kwargs)


@contextmanager
def status(message: str):
    """A one-line spinner for long single steps (model conversion, loading)."""
    if quiet():
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(message):
        yield
