"""One way to name a cache: spec strings shared by the CLI, the evaluation harness and the server.

A spec is ``name`` or ``name:key=value,key=value``, e.g. ``dynamic``, ``preallocated:max_seq_len=4096``,
``hf-quantized:backend=quanto,nbits=4``, ``tiny-turboquant:preset=safe``, ``kvforge-quant:preset=safe``.
``build_cache(spec, model)`` returns a fresh transformers ``Cache`` for one sequence (or batch).
Capabilities register their caches with :func:`register`; a spec whose backing package is missing
is *unavailable* (with the reason), not unknown.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


class UnknownCacheSpecError(ValueError):
    """A cache spec that names no registered cache, or a parameter that cache does not take."""


class CacheUnavailableError(RuntimeError):
    """A known cache spec whose backing package is not installed."""


class CacheNotRestorableError(ValueError):
    """A cache spec whose exported states cannot be imported back to continue exactly."""


@dataclass(frozen=True)
class CacheKind:
    name: str
    build: Callable[..., Any]  # build(model, **params) -> Cache
    defaults: dict[str, Any]
    description: str
    requires: tuple[str, ...] = ()  # importable modules needed
    hint: str = ""  # how to install them
    restorable: bool = True  # an exported state imports back into a fresh cache and continues exactly
    types: dict[str, str] = field(default_factory=dict)  # declared type names of parameters whose default is None
    # check(**params) raises ValueError for values no build would accept (an unknown preset), so that a bad
    # spec fails when it is parsed, before any model work
    check: Callable[..., None] | None = None

    def missing(self) -> list[str]:
        return [m for m in self.requires if not _importable(m)]


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # find_spec("a.b") imports "a", which raises when "a" itself is missing
        return False


_REGISTRY: dict[str, CacheKind] = {}


def register(name: str, defaults: dict[str, Any] | type, description: str, requires=(), hint: str = "",
             restorable: bool = True, check: Callable[..., None] | None = None):
    """Decorator registering ``fn(model, **params) -> Cache`` under spec name ``name``.

    ``defaults`` is a dict of parameter defaults or a dataclass whose fields are the parameters (a
    setting is then declared once, in that dataclass). ``restorable=False`` declares that a state
    exported from this cache cannot be imported back to continue exactly (a peer whose codes are not
    public, a diagnostic): the server's prefix store refuses such a spec at start-up. ``check(**params)``
    (optional) raises ``ValueError`` for parameter values that no build would accept; :func:`parse_spec`
    calls it.
    """
    types = {}
    if isinstance(defaults, type) and dataclasses.is_dataclass(defaults):
        types = {f.name: getattr(f.type, "__name__", str(f.type)) for f in dataclasses.fields(defaults)}
        defaults = {f.name: f.default for f in dataclasses.fields(defaults)}

    def wrap(fn):
        _REGISTRY[name] = CacheKind(name, fn, dict(defaults), description, tuple(requires), hint, restorable, types,
                                    check)
        return fn

    return wrap


def _ensure_registered() -> None:
    from ._capabilities import load_capabilities  # the built-in caches (kvforge.cache) register there too

    load_capabilities()


def known_specs() -> dict[str, CacheKind]:
    _ensure_registered()
    return dict(_REGISTRY)


@dataclass(frozen=True)
class CacheSpec:
    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.params.items())

    @property
    def kind(self) -> CacheKind:
        return known_specs()[self.name]

    def available(self) -> tuple[bool, str]:
        missing = self.kind.missing()
        if missing:
            return False, f"needs {', '.join(missing)}" + (f" ({self.kind.hint})" if self.kind.hint else "")
        return True, ""

    def check_restorable(self, purpose: str = "this use") -> None:
        """Raise :class:`CacheNotRestorableError` (naming the spec) unless its exported states continue exactly
        after an import into a fresh cache of the same spec."""
        if not self.kind.restorable:
            raise CacheNotRestorableError(
                f"cache spec {self} cannot be used for {purpose}: a state exported from it does not continue "
                "exactly after it is imported again (its codes are not exported, or it is a diagnostic); "
                "use 'dynamic' or 'kvforge-quant' instead"
            )

    def build(self, model):
        ok, why = self.available()
        if not ok:
            raise CacheUnavailableError(f"cache spec {self} is unavailable: {why}")
        return self.kind.build(model, **{**self.kind.defaults, **self.params})


def _coerce(value: str, default: Any, key: str, name: str, declared: str = "") -> Any:
    if default is None and declared in ("int", "float", "bool", "str"):  # an optional setting of a known type
        default = {"int": 0, "float": 0.0, "bool": False, "str": ""}[declared]
    try:
        if isinstance(default, bool):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        raise UnknownCacheSpecError(
            f"cache spec {name}: parameter {key}={value!r} is not {'an' if type(default).__name__[0] in 'aeiou' else 'a'} "
            f"{type(default).__name__}"
        ) from None
    if default is None:  # untyped: best effort
        for cast in (int, float):
            try:
                return cast(value)
            except ValueError:
                pass
        if value.lower() in ("none", ""):
            return None
    return value


def parse_spec(spec: str | CacheSpec) -> CacheSpec:
    """Parse ``name[:key=value,...]``; unknown names and parameters fail with the known ones listed."""
    if isinstance(spec, CacheSpec):
        return spec
    text = spec.strip()
    name, _, rest = text.partition(":")
    kinds = known_specs()
    if name not in kinds:
        raise UnknownCacheSpecError(f"unknown cache spec {name!r}; known: {', '.join(sorted(kinds))}")
    kind = kinds[name]
    params: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise UnknownCacheSpecError(f"cache spec {text!r}: expected key=value, got {item!r}")
        if key not in kind.defaults:
            raise UnknownCacheSpecError(
                f"cache spec {name!r} has no parameter {key!r}; parameters: {', '.join(kind.defaults) or 'none'}"
            )
        params[key] = _coerce(value, kind.defaults[key], key, name, kind.types.get(key, ""))
    if kind.check is not None:
        kind.check(**{**kind.defaults, **params})
    return CacheSpec(name, params)


def split_specs(text: str) -> list[str]:
    """Split a list of specs on commas (or semicolons), keeping a spec's own ``key=value`` parameters.

    ``"dynamic,tiny-turboquant:key_bits=4,value_bits=2,noisy"`` gives
    ``["dynamic", "tiny-turboquant:key_bits=4,value_bits=2", "noisy"]``: a piece holding ``=`` but no
    ``:`` continues the spec before it.
    """
    specs: list[str] = []
    for piece in (p.strip() for p in text.replace(";", ",").split(",")):
        if not piece:
            continue
        if "=" in piece and ":" not in piece:
            if not specs:
                raise UnknownCacheSpecError(f"cache list {text!r} starts with a parameter {piece!r}, not a spec name")
            specs[-1] += ("," if ":" in specs[-1] else ":") + piece
        else:
            specs.append(piece)
    return specs


def build_cache(spec: str | CacheSpec, model):
    """A fresh cache for ``model`` from a spec string or :class:`CacheSpec`."""
    return parse_spec(spec).build(model)


# ---------------------------------------------------------------------------- memory accounting
def cache_nbytes(cache) -> int:
    """Bytes actually held by a cache: every distinct tensor storage reachable from its layers.

    Counting storages (not tensor views) is what makes this honest: a view that pins a larger buffer
    counts the whole buffer, and two views of one buffer count it once. Works for any cache object
    (transformers', kvforge's, a peer's): it walks the object's attributes, not a known layout.
    """
    seen_storage: set[int] = set()
    seen_obj: set[int] = set()
    total = 0

    def visit(obj, depth: int) -> None:
        nonlocal total
        if obj is None or depth > 6 or id(obj) in seen_obj:
            return
        seen_obj.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
                names, _ = obj.__tensor_flatten__()
                for n in names:
                    visit(getattr(obj, n), depth + 1)
                return
            try:
                st = obj.untyped_storage()
            except (RuntimeError, NotImplementedError):
                total += obj.numel() * obj.element_size()
                return
            if st.data_ptr() not in seen_storage and obj.device.type != "meta":
                seen_storage.add(st.data_ptr())
                total += st.nbytes()
            return
        if isinstance(obj, dict):
            for v in obj.values():
                visit(v, depth + 1)
        elif isinstance(obj, list | tuple):
            for v in obj:
                visit(v, depth + 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type | torch.nn.Module):
            for v in vars(obj).values():
                visit(v, depth + 1)

    visit(cache, -1)
    return total
