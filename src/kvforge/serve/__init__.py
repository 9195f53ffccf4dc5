"""An OpenAI-compatible server over compressed, reusable KV caches (``kvforge serve``; extra ``serve``).

Public API::

    ServeConfig, build, run, BackgroundServer     settings; (app, engine) for a model; serve with uvicorn
    Engine, Request, SamplingParams, Event        continuous batching, each request with its own cache
    BatchedCache                                  one forward pass over many caches of different lengths
    PrefixStore                                   prompt-prefix KV states: memory, directory or Redis
    create_app, ServerInfo                        the FastAPI app (completions, chat, models, health, metrics)
"""

from .batch import BatchedCache, BatchedDecodeCache
from .engine import Engine, Event, Overloaded, Request, RequestTooLarge, SamplingParams
from .store import PrefixStore

__all__ = [
    "BackgroundServer",
    "BatchedCache",
    "BatchedDecodeCache",
    "Engine",
    "Event",
    "Overloaded",
    "PrefixStore",
    "Request",
    "RequestTooLarge",
    "SamplingParams",
    "ServeConfig",
    "ServerInfo",
    "build",
    "create_app",
    "run",
]


def __getattr__(name):
    # the HTTP layer needs fastapi and uvicorn (the serve extra); the engine and store do not
    if name in ("ServerInfo", "create_app"):
        from . import api

        return getattr(api, name)
    if name in ("ServeConfig", "build", "run", "BackgroundServer"):
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module 'kvforge.serve' has no attribute {name!r}")
