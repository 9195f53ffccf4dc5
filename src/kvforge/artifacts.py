"""One way to write and read kvforge's files: KV states, translators and MLA conversions.

Every artifact is safetensors tensors (or a JSON file beside weights) with one JSON header under a
metadata key: ``{"format": NAME, "format_version": N, "sha256": ..., ...}``. Reading checks, in order,
that the bytes are readable, that the header is there and names the expected format, that its version
is not newer than this kvforge reads, and (for tensors) that the SHA-256 of the tensors matches. Every
failure raises :class:`ArtifactError` naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from safetensors.torch import save_file


class ArtifactError(ValueError):
    """A kvforge file that is missing, not a kvforge file of the expected kind, truncated or corrupted, or
    written by a newer kvforge."""


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes (order-independent)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def make_header(format_name: str, version: int, tensors: dict[str, torch.Tensor] | None = None, **fields) -> dict:
    header = {"format": format_name, "format_version": version, **fields}
    if tensors is not None:
        header["sha256"] = digest(tensors)
    return header


def check_version(found: Any, version: int, where: str, what: str, error=ArtifactError) -> None:
    """Raise ``error`` unless ``found`` is a format version (an int) no newer than ``version``: the one version
    check of every kvforge file (KV states, translators, MLA conversions)."""
    if not isinstance(found, int) or found > version:
        raise error(f"{where}: written in {what} format version {found}, newer than this kvforge reads "
                    f"(version {version}); upgrade kvforge")


def check_header(header: Any, format_name: str, version: int, where: str, error=ArtifactError) -> dict:
    """Raise ``error`` unless ``header`` is a kvforge header of ``format_name`` no newer than ``version``."""
    if not isinstance(header, dict) or header.get("format") != format_name:
        got = header.get("format") if isinstance(header, dict) else None
        raise error(f"{where}: not a {format_name} file (format {got!r})")
    check_version(header.get("format_version"), version, where, format_name, error)
    return header


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], header: dict, key: str = "kvforge") -> Path:
    """Write ``tensors`` and ``header`` (JSON under metadata ``key``) atomically (a temporary file, renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={key: json.dumps(header)})
    tmp.replace(path)
    return path


def tensors_to_bytes(tensors: dict[str, torch.Tensor], header: dict, key: str = "kvforge") -> bytes:
    return save_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata={key: json.dumps(header)})


def read_tensors(source: str | Path | bytes, format_name: str, version: int, *, key: str = "kvforge",
                 verify: bool = True, where: str | None = None, error=ArtifactError) -> tuple[dict, dict]:
    """``(header, tensors)`` of a file (path) or bytes written by :func:`save_tensors` /
    :func:`tensors_to_bytes`, checked as the module docstring says."""
    if isinstance(source, bytes):
        where = where or "kvforge bytes"
        try:
            n = int.from_bytes(source[:8], "little")
            raw = (json.loads(source[8 : 8 + n]).get("__metadata__") or {}).get(key)
            tensors = load_bytes(source)
        except (SafetensorError, OSError, RuntimeError, ValueError, UnicodeDecodeError) as e:
            raise error(f"{where}: not readable safetensors bytes (truncated or corrupted?): {e}") from e
    else:
        where = where or str(source)
        if not Path(source).exists():
            raise error(f"{where}: no such file")
        try:
            with safe_open(str(source), framework="pt") as f:
                raw = (f.metadata() or {}).get(key)
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise error(f"{where}: not a readable safetensors file (truncated or corrupted?): {e}") from e
    if raw is None:
        raise error(f"{where}: a safetensors file but not a {format_name} file (no {key!r} metadata)")
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as e:
        raise error(f"{where}: corrupted kvforge metadata: {e}") from e
    check_header(header, format_name, version, where, error)
    if verify and "sha256" in header and digest(tensors) != header["sha256"]:
        raise error(f"{where}: integrity check failed (SHA-256 of the tensors differs): the file is corrupted")
    return header, tensors


def read_json(path: str | Path, format_name: str, version: int, error=ArtifactError) -> dict:
    """A JSON artifact file (e.g. an MLA conversion's settings), header-checked."""
    try:
        header = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not a readable {format_name} file ({e})") from e
    return check_header(header, format_name, version, str(path), error)
