"""One way to name a cache: spec strings shared by the CLI, the evaluation harness and the server.

A spec is ``name`` or ``name:key=value,key=value``, e.g. ``dynamic``, ``preallocated:max_seq_len=4096``,
``hf-quantized:backend=quanto,nbits=4``, ``tiny-turboquant:preset=safe``, ``kvforge-quant:preset=safe``.
``build_cache(spec, model)`` returns a fresh transformers ``Cache`` for one sequence (or batch).
Capabilities register their caches with :func:`register`; a spec whose backing package is missing
is *unavailable* (with the reason), not unknown.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


class UnknownCacheSpecError(ValueError):
    """A cache spec that names no registered cache, or a parameter that cache does not take."""


class CacheUnavailableError(RuntimeError):
    """A known cache spec whose backing package is not installed."""


@dataclass(frozen=True)
class CacheKind:
    name: str
    build: Callable[..., Any]  # build(model, **params) -> Cache
    defaults: dict[str, Any]
    description: str
    requires: tuple[str, ...] = ()  # importable modules needed
    hint: str = ""  # how to install them

    def missing(self) -> list[str]:
        return [m for m in self.requires if not _importable(m)]


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # find_spec("a.b") imports "a", which raises when "a" itself is missing
        return False


_REGISTRY: dict[str, CacheKind] = {}


def register(name: str, defaults: dict[str, Any], description: str, requires=(), hint: str = ""):
    """Decorator registering ``fn(model, **params) -> Cache`` under spec name ``name``."""

    def wrap(fn):
        _REGISTRY[name] = CacheKind(name, fn, dict(defaults), description, tuple(requires), hint)
        return fn

    return wrap


def _ensure_registered() -> None:
    from ._capabilities import load_capabilities

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

    def build(self, model):
        ok, why = self.available()
        if not ok:
            raise CacheUnavailableError(f"cache spec {self} is unavailable: {why}")
        return self.kind.build(model, **{**self.kind.defaults, **self.params})


def _coerce(value: str, default: Any, key: str, name: str) -> Any:
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
            f"cache spec {name}: parameter {key}={value!r} is not a {type(default).__name__}"
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
        params[key] = _coerce(value, kind.defaults[key], key, name)
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


# ---------------------------------------------------------------------------- built-in specs
@register("dynamic", {}, "transformers DynamicCache (full precision; sliding layers keep their window)")
def _dynamic(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@register("preallocated", {"max_seq_len": 4096}, "kvforge's pre-allocated reference cache (fixed capacity)")
def _preallocated(model, max_seq_len):
    from .cache import PreallocatedCache

    return PreallocatedCache(model, max_seq_len)


@register(
    "hf-quantized",
    {"backend": "quanto", "nbits": 4, "q_group_size": 64, "residual_length": 128},
    "transformers' QuantizedCache (quanto or hqq backend; full-attention models only)",
    requires=("optimum.quanto",),
    hint="pip install optimum-quanto",
)
def _hf_quantized(model, backend, nbits, q_group_size, residual_length):
    from transformers import QuantizedCache

    return QuantizedCache(
        backend, model.config, nbits=nbits, q_group_size=q_group_size, residual_length=residual_length
    )


@register(
    "noisy",
    {"std": 0.1, "seed": 0},
    "diagnostic: a DynamicCache that adds Gaussian noise (std relative to each tensor's RMS) to stored keys and values",
)
def _noisy(model, std, seed):
    from .cache.noisy import noisy_cache

    return noisy_cache(model, std, seed)


@register(
    "tiny-turboquant",
    {"preset": "safe", "key_bits": 0, "value_bits": 0},
    "peer: tiny-turboquant's TinyKVCache (KIVI-style; presets safe, balanced, compact, aggressive)",
    requires=("tiny_turboquant",),
    hint="pip install 'kvforge[peers]'",
)
def _tiny_turboquant(model, preset, key_bits, value_bits):
    from tiny_turboquant import TinyKVCache

    class TinyKVCacheCompat(TinyKVCache):
        """TinyKVCache whose ``update`` also takes the ``kwargs=`` keyword that
        transformers >= 5.24 passes (tiny-turboquant 0.18 only knows the older
        positional ``cache_kwargs``)."""

        def update(self, key_states, value_states, layer_idx, cache_kwargs=None, **kwargs):
            if cache_kwargs is None:
                cache_kwargs = kwargs.get("kwargs") or kwargs.get("cache_kwargs")
            return super().update(key_states, value_states, layer_idx, cache_kwargs)

    if key_bits or value_bits:
        return TinyKVCacheCompat.for_model(model, key_bits=key_bits or 4, value_bits=value_bits or 4)
    return TinyKVCacheCompat.for_model(model, compression=preset)
