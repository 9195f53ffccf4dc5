"""The connector's settings (vLLM's ``kv_connector_extra_config``), its version guard, and the model and
prefix store it opens once per process."""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from dataclasses import dataclass

import torch

from ...models import load_skeleton
from ...serve import PrefixStore
from ...serve.backends import check_location
from ...specs import parse_spec
from ...state import KVState

log = logging.getLogger("vllm.kvforge")  # under vLLM's logger: its handlers and level

# the vLLM releases this connector was tested with (>= first, < second), by vllm.__version__
TESTED_VLLM = ("0.32.0", "0.33.0")


@dataclass(frozen=True)
class ConnectorConfig:
    """``kv_connector_extra_config`` of :class:`~kvforge.integrations.vllm.KVForgeConnector`.

    ``store``: ``memory`` (this process only), a directory, or ``redis://HOST:PORT[/DB]``, as for
    ``kvforge serve --kv-store``. ``cache``: the kvforge cache spec entries are stored in (``dynamic``,
    ``kvforge-quant:preset=safe``, ...): quantized on save, dequantized on load. ``store_bytes``: the store's
    budget (least recently used entries go first). ``block``: prefixes are hashed and matched in blocks of
    this many tokens; keep kvforge serve's 32 so that the two find each other's entries. ``min_tokens``:
    shorter prefixes are neither stored nor loaded (at least one block). ``model``: the model whose
    fingerprint namespaces the entries (default: vLLM's model directory). Entries are shared with
    ``kvforge serve`` when the spec string is the same, parameters in the same order.
    """

    store: str = "memory"
    cache: str = "dynamic"
    store_bytes: int = 1 << 30
    block: int = 32
    min_tokens: int = 64
    model: str = ""

    @classmethod
    def from_extra(cls, extra: dict | None) -> ConnectorConfig:
        """Parse ``kv_connector_extra_config``; raises ``ValueError`` naming an unknown key or a bad value."""
        extra = dict(extra or {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(extra) - set(known))
        if unknown:
            raise ValueError(f"kvforge connector: unknown kv_connector_extra_config key(s) {', '.join(unknown)}; "
                             f"known: {', '.join(known)}")
        values = {}
        for key, raw in extra.items():
            kind = type(known[key].default)
            try:
                if raw is None or isinstance(raw, bool) or (kind is str and not isinstance(raw, str)) or (
                        kind is int and isinstance(raw, float) and not raw.is_integer()):
                    raise TypeError
                values[key] = kind(raw)
            except (TypeError, ValueError):
                article = "an" if kind.__name__[0] in "aeiou" else "a"
                raise ValueError(f"kvforge connector: {key}={raw!r} is not {article} {kind.__name__}") from None
        cfg = cls(**values)
        for key in ("block", "store_bytes", "min_tokens"):
            if getattr(cfg, key) < (0 if key == "min_tokens" else 1):
                raise ValueError(f"kvforge connector: {key}={getattr(cfg, key)} must be "
                                 f"{'>= 0' if key == 'min_tokens' else '>= 1'}")
        if cfg.store != "memory":
            try:
                check_location(cfg.store)
            except ValueError as e:
                raise ValueError(f"kvforge connector: store={cfg.store!r}: {e}") from e
        try:
            parse_spec(cfg.cache).check_restorable("the vLLM connector's store")
        except ValueError as e:
            raise ValueError(f"kvforge connector: cache={cfg.cache!r}: {e}") from e
        return cfg


def store_label(location: str) -> str:
    """``location`` for a log line, a Redis password masked."""
    return re.sub(r"//[^@/]*@", "//***@", location)


def _version_tuple(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split("+")[0].split("."):
        digits = "".join(c for c in part if c.isdigit())
        if not digits:
            break
        out.append(int(digits))
        if len(out) == 3:
            break
    return tuple(out)


def check_vllm_version(version: str) -> str | None:
    """A warning when ``version`` is outside :data:`TESTED_VLLM`, else ``None``."""
    lo, hi = (_version_tuple(v) for v in TESTED_VLLM)
    if lo <= _version_tuple(version) < hi:
        return None
    return (f"kvforge's vLLM connector was tested with vLLM >={TESTED_VLLM[0]},<{TESTED_VLLM[1]}; this is vLLM "
            f"{version}. vLLM's KV-connector API is marked experimental and changes between releases: check "
            "the results (python -m pytest tests/test_vllm_connector.py) before relying on it")


# ------------------------------------------------------------------------------- one per process
_LOCK = threading.Lock()
_OPEN: dict[tuple, tuple[object, PrefixStore]] = {}
# states the scheduler side validated for a request, for a worker in the same process (vLLM's in-process
# executor) so that it does not read and check the same entry again; another process reads it itself
_HANDOFF: dict[str, KVState] = {}
_HANDOFF_MAX = 64


def open_store(cfg: ConnectorConfig, model_dir: str, dtype: torch.dtype) -> tuple[object, PrefixStore]:
    """The model skeleton (no weights) and prefix store for ``cfg``, shared by the scheduler and worker sides
    of one process (a ``memory`` store is then the same store for both)."""
    key = (cfg, model_dir, dtype)
    with _LOCK:
        if key not in _OPEN:
            model = load_skeleton(cfg.model or model_dir, dtype)
            store = PrefixStore(model, cfg.cache, cfg.store, max_bytes=cfg.store_bytes, block=cfg.block,
                                min_tokens=cfg.min_tokens)
            log.info("kvforge connector: model %s (fingerprint %s), cache %s, store %s", model_dir,
                     store.fingerprint, cfg.cache, store_label(cfg.store))
            _OPEN[key] = (model, store)
        return _OPEN[key]


def guarded(what: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, or ``None`` when the store cannot be read (Redis down, a file gone): the request
    is then served without it (a miss), with a warning, instead of stopping vLLM's scheduler."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - any store failure is a miss, never a failed request
        log.warning("kvforge connector: %s failed, treated as a miss: %s: %s", what, type(e).__name__, e)
        return None


def hand_over(req_id: str, state: KVState) -> None:
    with _LOCK:
        _HANDOFF[req_id] = state
        while len(_HANDOFF) > _HANDOFF_MAX:
            _HANDOFF.pop(next(iter(_HANDOFF)))


def take_over(req_id: str) -> KVState | None:
    with _LOCK:
        return _HANDOFF.pop(req_id, None)


def drop_handoff(req_id: str) -> None:
    with _LOCK:
        _HANDOFF.pop(req_id, None)
