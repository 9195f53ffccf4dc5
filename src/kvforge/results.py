"""One way to write results: a new folder per run, named after its settings, never overwritten.

``kvforge bench`` and every script in ``benchmarks/`` write through this module::

    res = Results("benchmarks/results", folder_name("quant", settings, "smollm2-135m", "w4"), settings)
    ...                                     # the run
    res.write_table(markdown, rows=rows, extra=...)   # results.md and results.json (metadata + rows)
    res.announce()                          # prints where the files are

* :func:`new_results_dir` makes ``root/name``, or ``name-2``, ``name-3``, ... when it exists: a rerun never
  overwrites an earlier one.
* :func:`metadata` is the one description of a run: kvforge, torch, transformers and python versions, torch
  threads, the machine (platform, CPU count, GPU), the command line and the start time (plus the settings).
* Paths stored in results are relative to the results folder or the project (the checkout holding
  ``pyproject.toml``/``.git``, else the working directory), never absolute paths of this machine.

Foundation module: the standard library, torch and transformers only (no capability is imported).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import platform
import re
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "Results",
    "command_line",
    "folder_name",
    "metadata",
    "new_results_dir",
    "portable",
    "project_root",
    "relative",
    "settings_digest",
]

META_KEYS = ("kvforge", "torch", "transformers", "python", "threads", "machine", "command", "started")


# ---------------------------------------------------------------------------- folders
def new_results_dir(root: str | Path, name: str) -> Path:
    """Create and return ``root/name``; ``root/name-2``, ``-3``, ... if taken (never reuses a folder)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    i = 1
    while True:
        path = root / (name if i == 1 else f"{name}-{i}")
        try:
            path.mkdir()  # atomic: two runs started at once still get two folders
            return path
        except FileExistsError:
            i += 1


def settings_digest(settings: Mapping[str, Any] | None, n: int = 8) -> str:
    """A short hash of ``settings`` (JSON, sorted keys): runs with different settings get different names."""
    text = json.dumps(portable(settings or {}), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _slug(part: Any) -> str:
    s = str(part).strip().replace(os.sep, "_").replace("/", "_")
    s = "".join(c if c.isalnum() or c in "-_.+=" else "-" for c in s)
    return s.strip("-_.") or "_"


def folder_name(prefix: str, settings: Mapping[str, Any] | None = None, *parts: Any) -> str:
    """``prefix_part_part_<digest of settings>``: readable settings in ``parts``, all of them in the digest."""
    pieces = [_slug(prefix), *(_slug(p) for p in parts if p is not None and str(p) != "")]
    if settings is not None:
        pieces.append(settings_digest(settings))
    return "_".join(pieces)


# ---------------------------------------------------------------------------- paths
def project_root(start: str | Path | None = None) -> Path | None:
    """The nearest folder at or above ``start`` (default: the working directory) holding ``pyproject.toml``
    or ``.git``; ``None`` when there is none."""
    here = Path(start or os.getcwd()).resolve()
    for d in (here, *here.parents):
        if (d / "pyproject.toml").is_file() or (d / ".git").exists():
            return d
    return None


def _bases(*extra: str | Path | None) -> list[Path]:
    out: list[Path] = []
    for b in (*extra, project_root(), os.getcwd()):
        if b is not None:
            p = Path(b).resolve()
            if p not in out and p != Path(p.anchor):  # never "relative to /"
                out.append(p)
    return out


def relative(path: str | Path, *bases: str | Path | None) -> str:
    """``path`` relative to the first of ``bases``, the project or the working directory that holds it;
    a path outside all of them is reduced to its name (never an absolute path of this machine)."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        return p.as_posix()
    p = p.resolve()
    for b in _bases(*bases):
        try:
            return p.relative_to(b).as_posix() or "."
        except ValueError:
            continue
    return p.name or "."


def _looks_absolute(s: str) -> bool:
    return len(s) < 4096 and "\n" not in s and os.path.isabs(os.path.expanduser(s)) and s != os.sep


def portable(obj: Any, *bases: str | Path | None) -> Any:
    """``obj`` with every path (``Path`` or string holding an absolute path) made :func:`relative`;
    dicts, lists, tuples and sets are walked."""
    if isinstance(obj, Path):
        return relative(obj, *bases)
    if isinstance(obj, str):
        return relative(obj, *bases) if _looks_absolute(obj) else obj
    if isinstance(obj, Mapping):
        return {k: portable(v, *bases) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [portable(v, *bases) for v in obj]
    return obj


# the folders of an absolute path inside free text (not after a word character, ``.``, ``:``, ``/``, ``~``
# or ``-``: ``tokens/s``, URLs and relative paths stay as they are)
_ABS_DIRS = re.compile(r"(?<![\w.:/~\-])/(?:[^\s/'\"`|,;:()\[\]{}<>*]+/)+(?=[^\s/'\"`|,;:()\[\]{}<>*])")


def _scrub(text: str, *bases: str | Path | None) -> str:
    """Absolute paths taken out of free text (error messages, tracebacks, markdown): the results folder's,
    the project's and the working directory's prefixes removed, the home folder written ``~``, and any
    other absolute path reduced to its name. The last safety net against machine paths in results."""
    prefixes = [(str(b) + os.sep, "") for b in _bases(*bases)]
    home = os.path.expanduser("~")
    if home not in ("~", os.sep):
        prefixes.append((home + os.sep, "~" + os.sep))
    for old, new in sorted(prefixes, key=lambda x: -len(x[0])):
        text = text.replace(old, new)
    return _ABS_DIRS.sub("", text)


# ---------------------------------------------------------------------------- metadata
def command_line(argv: Iterable[str] | None = None) -> str:
    """The command that started this process, with paths made :func:`relative` (``python -m pkg`` for a
    package's ``__main__``)."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return ""
    words = []
    first = Path(argv[0])
    if first.name == "__main__.py":
        words.append(f"python -m {first.parent.name}")
    elif first.suffix == ".py":
        words.append(f"python {relative(first)}")
    else:
        words.append(relative(first) if first.is_absolute() else argv[0])
    for a in argv[1:]:
        if a.startswith("-") and "=" in a:
            flag, value = a.split("=", 1)
            a = f"{flag}={portable(value)}"
        else:
            a = portable(a)
        words.append(a if a and not any(c.isspace() for c in a) and "'" not in a else repr(a))
    return " ".join(words)


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return None


def metadata(settings: Mapping[str, Any] | None = None, argv: Iterable[str] | None = None) -> dict:
    """What every results file says about its run: versions, threads, machine, command line, start time
    (now), and ``settings`` when given (paths made relative)."""
    import transformers

    from . import __version__

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    meta = {
        "kvforge": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "gpu": gpu},
        "command": command_line(argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if settings is not None:
        meta["settings"] = portable(dict(settings))
    return meta


# ---------------------------------------------------------------------------- writing
def _cell(v: Any) -> Any:
    return json.dumps(v, default=str) if isinstance(v, Mapping | list | tuple) else v


class Results:
    """One run's results: its metadata (taken when the run starts) and its folder under ``root``, made by
    :func:`new_results_dir` on the first write (a run that fails before writing leaves nothing behind;
    one that saves as it goes keeps what it measured if cut short)."""

    def __init__(self, root: str | Path, name: str, settings: Mapping[str, Any] | None = None):
        self.root, self.name = Path(root), name
        self.meta = metadata(settings)
        self._folder: Path | None = None
        self._t0 = time.perf_counter()
        self.written: list[Path] = []

    @property
    def folder(self) -> Path:
        if self._folder is None:
            self._folder = new_results_dir(self.root, self.name)
        return self._folder

    # paths
    def path(self, name: str) -> Path:
        return self.folder / name

    def relative(self, path: str | Path) -> str:
        """``path`` relative to this folder when inside it, else to the project (see :func:`relative`)."""
        return relative(path, self.folder)

    def _record(self, path: Path) -> Path:
        if path not in self.written:
            self.written.append(path)
        return path

    # files
    def write_text(self, name: str, text: str) -> Path:
        p = self.path(name)
        p.write_text(_scrub(text if text.endswith("\n") else text + "\n", self.folder))
        return self._record(p)

    def write_json(self, name: str, data: Mapping[str, Any]) -> Path:
        """``{metadata..., "seconds": since start, data...}``; a key of ``data`` that is a metadata key is
        an error (the metadata is the same in every results file)."""
        clash = sorted(set(data) & {*self.meta, "seconds"})
        if clash:
            raise ValueError(f"results data uses metadata key(s) {', '.join(clash)}")
        body = {**self.meta, "seconds": round(time.perf_counter() - self._t0, 1), **data}
        p = self.path(name)
        p.write_text(_scrub(json.dumps(portable(body, self.folder), indent=1, default=str), self.folder) + "\n")
        return self._record(p)

    def write_csv(self, name: str, rows: list[Mapping[str, Any]]) -> Path:
        """``rows`` as CSV: one column per key seen (in order of appearance), nested values as JSON."""
        cols: dict[str, None] = {}
        for r in rows:
            cols.update(dict.fromkeys(r))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(cols), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(portable(v, self.folder)) for k, v in r.items()})
        p = self.path(name)
        p.write_text(_scrub(buf.getvalue(), self.folder))
        return self._record(p)

    def write_table(self, markdown: str, rows: list[Mapping[str, Any]] | None = None, *, stem: str = "results",
                    with_csv: bool = False, **data: Any) -> list[Path]:
        """``stem.md`` (``markdown``), ``stem.json`` (metadata, ``rows`` and ``data``) and with ``with_csv``
        the rows as ``stem.csv``. Returns the paths written."""
        out = [self.write_text(f"{stem}.md", markdown)]
        out.append(self.write_json(f"{stem}.json", {**({"rows": rows} if rows is not None else {}), **data}))
        if with_csv and rows:
            out.append(self.write_csv(f"{stem}.csv", rows))
        return out

    def remove(self, name: str) -> None:
        """Delete ``name`` from this run's folder (e.g. a ``partial.json`` a finished run replaced) and from
        :attr:`written`."""
        p = self.path(name)
        p.unlink(missing_ok=True)
        self.written = [w for w in self.written if w != p]

    def announce(self, file=None) -> str:
        """Print (to stderr) and return the folder and the files written in it (the folder as the user can
        find it: relative to the working directory when inside it; this message is not stored)."""

        def where(p: Path) -> str:
            p = p.resolve()
            return p.relative_to(Path.cwd().resolve()).as_posix() if p.is_relative_to(Path.cwd().resolve()) else str(p)

        if self._folder is None:
            msg = f"no results written (they would go to {where(self.root / self.name)})"
        else:
            msg = f"results in {where(self._folder)}/: {', '.join(p.name for p in self.written)}"
        print(msg, file=file or sys.stderr, flush=True)
        return msg
