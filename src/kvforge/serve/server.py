"""Putting a server together: settings, model + engine + prefix store + app, and running it with uvicorn."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .api import ServerInfo, create_app
from .engine import Engine
from .store import PrefixStore


@dataclass
class ServeConfig:
    model: str = "smollm2-135m"  # bundled name, local directory or hub id
    cache: str = "dynamic"  # cache spec (kvforge.specs)
    host: str = "127.0.0.1"
    port: int = 8000
    kv_store: str | None = None  # None/"memory", a directory, or redis://HOST:PORT
    store_bytes: int = 2 << 30  # prefix-store budget (LRU eviction past it)
    store_block: int = 32  # prefixes are stored and matched in blocks of this many tokens
    store_min_tokens: int = 64
    no_store: bool = False
    max_kv_bytes: int | None = None  # live caches' budget; past it requests wait, then get 503
    max_queue: int = 64
    max_batch: int = 32
    prefill_chunk: int = 256
    default_max_tokens: int = 512
    dtype: str = "float32"
    served_name: str | None = None  # the "model" clients send (default: the --model value)
    threads: int | None = None  # torch CPU threads (default: torch's own choice)
    require_cache_salt: bool = False  # refuse requests without a cache_salt
    preload: str | None = None  # JSON lines of prefixes to store and pin at start-up
    chat_template: str | None = None  # a Jinja chat template file for a model without one

    def __post_init__(self):
        for name in ("max_queue", "max_batch", "prefill_chunk", "store_block", "default_max_tokens"):
            if getattr(self, name) < (0 if name == "max_queue" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_kv_bytes is not None and self.max_kv_bytes <= 0:
            raise ValueError(f"max_kv_bytes must be positive, got {self.max_kv_bytes}")


def build(config: ServeConfig, model=None, tokenizer=None):
    """``(app, engine)`` for ``config``; pass ``model``/``tokenizer`` to serve an already loaded model."""
    if model is None:
        from ..models import load_model

        model, tokenizer = load_model(config.model, dtype=config.dtype)
    if config.chat_template:
        tokenizer.chat_template = Path(config.chat_template).read_text()
    store = None
    if not config.no_store:
        store = PrefixStore(model, config.cache, config.kv_store, max_bytes=config.store_bytes,
                            block=config.store_block, min_tokens=config.store_min_tokens)
    engine = Engine(model, tokenizer, config.cache, store=store, max_kv_bytes=config.max_kv_bytes,
                    max_queue=config.max_queue, max_batch=config.max_batch, prefill_chunk=config.prefill_chunk)
    app = create_app(engine, ServerInfo(config.served_name or config.model, str(engine.spec),
                                        default_max_tokens=config.default_max_tokens,
                                        require_cache_salt=config.require_cache_salt))
    if config.preload:
        preload(engine, config.preload)
    engine.start()
    return app, engine


def preload(engine: Engine, path: str) -> list[dict]:
    """Store and pin the prefixes of a JSON-lines file (``{"prompt": text or token ids, "cache_salt": ...}``),
    before traffic. Raises ``ValueError`` naming the line of a bad entry."""
    import json

    out = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            prompt = item["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{i}: expected a JSON object with a 'prompt' ({e})") from None
        if isinstance(prompt, str):
            ids = list(engine.tokenizer(prompt).input_ids)
        elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            ids = prompt
        else:
            raise ValueError(f"{path}:{i}: 'prompt' must be text or a list of token ids")
        try:
            out.append(engine.store_prefix(ids, item.get("cache_salt"), pin=True))
        except ValueError as e:
            raise ValueError(f"{path}:{i}: {e}") from None
    return out


def run(config: ServeConfig) -> None:
    """Serve until interrupted (``kvforge serve``)."""
    import torch
    import uvicorn

    if config.threads:
        torch.set_num_threads(config.threads)
    app, engine = build(config)
    where = f"http://{config.host}:{config.port}"
    store = engine.store.location if engine.store is not None else "off"
    print(f"kvforge serve: {config.served_name or config.model} with cache {engine.spec} at {where}/v1 "
          f"(prefix store: {store}, max KV bytes: {config.max_kv_bytes or 'unlimited'})", flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")


class BackgroundServer:
    """A uvicorn server on a thread of this process (tests, benchmarks): ``.url``, ``.stop()``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="kvforge-uvicorn", daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
