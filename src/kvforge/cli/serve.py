"""``kvforge serve``: the OpenAI-compatible server (needs the ``serve`` extra)."""

from __future__ import annotations

from pathlib import Path


def _bytes(text: str) -> int:
    """``1073741824``, ``512M``, ``2G``, ``1.5GiB`` -> bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if scale > 1 else t) * scale)
    except ValueError:
        raise ValueError(f"not a byte count: {text!r} (e.g. 1073741824, 512M, 2G)") from None


def add_commands(sub) -> None:
    import argparse

    from .core import _model_arg

    p = sub.add_parser("serve", help="OpenAI-compatible server: batched requests, shared prefix store")
    _model_arg(p)
    p.add_argument("--cache", default="dynamic", help="cache spec, e.g. dynamic or kvforge-quant:preset=safe")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--kv-store", default=None, help="prefix store: memory (default), a directory, or redis://HOST:PORT")
    p.add_argument("--store-bytes", type=_bytes, default=2 << 30, help="prefix-store budget, LRU past it (default 2G)")
    p.add_argument("--no-store", action="store_true", help="no prefix store")
    p.add_argument("--max-kv-bytes", type=_bytes, default=None,
                   help="KV bytes of requests in flight; past it requests wait, then get 503 (default: unlimited)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for KV memory (default 64)")
    p.add_argument("--max-batch", type=int, default=32, help="requests in one decode batch (default 32)")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens per prefill pass while others generate (default 256)")
    p.add_argument("--served-name", default=None, help="the model name clients send (default: the --model value)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--require-cache-salt", action="store_true",
                   help="refuse requests without a cache_salt (prefixes are shared only under the same salt)")
    p.add_argument("--preload", default=None, metavar="FILE",
                   help="prefixes to store and pin at start-up: JSON lines {\"prompt\": text or token ids, \"cache_salt\": ...}")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template for a model without one (chat requests are refused otherwise)")
    p.add_argument("--default-max-tokens", type=int, default=512, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from ..specs import parse_spec

    parse_spec(args.cache)  # a bad spec fails before the model loads
    for name in ("preload", "chat_template"):
        path = getattr(args, name)
        if path is not None and not Path(path).is_file():
            raise ValueError(f"--{name.replace('_', '-')} {path}: no such file")
    try:
        from ..serve.server import ServeConfig, run
    except ImportError as e:
        raise RuntimeError(f"kvforge serve needs the serve extra ({e.name} is missing): pip install 'kvforge[serve]'") from e
    run(ServeConfig(model=args.model, cache=args.cache, host=args.host, port=args.port, kv_store=args.kv_store,
                    store_bytes=args.store_bytes, no_store=args.no_store, max_kv_bytes=args.max_kv_bytes,
                    max_queue=args.max_queue, max_batch=args.max_batch, prefill_chunk=args.prefill_chunk,
                    default_max_tokens=args.default_max_tokens, dtype=args.dtype, served_name=args.served_name,
                    threads=args.threads, require_cache_salt=args.require_cache_salt, preload=args.preload,
                    chat_template=args.chat_template))
    return 0
