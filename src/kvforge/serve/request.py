"""What the engine is given and what it answers: a request, its sampling settings, its events, and the
two ways a request can be refused before it runs (:class:`Overloaded`, :class:`RequestTooLarge`)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .text import TextStream


class Overloaded(RuntimeError):
    """The wait queue is full: try again later (HTTP 503 with Retry-After)."""


class RequestTooLarge(ValueError):
    """A request that could never be admitted (its KV cache alone would pass the budget)."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Event:
    """What the engine tells a request's owner: new text, or the end (``finish_reason`` set), or an error."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict | None = None
    error: str | None = None


_ids = itertools.count(1)


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    cache_salt: str | None = None  # the tenant's salt: prefixes are shared only under the same salt
    id: int = field(default_factory=lambda: next(_ids))
    # engine-side state
    cache: object = None
    seen: int = 0  # tokens fed to the cache
    reserved: int = 0  # KV bytes reserved at admission
    kv_bytes: int = 0  # KV bytes last measured
    prefix_tokens: int = 0  # tokens taken from the prefix store
    store_at: int | None = None
    generated: list[int] = field(default_factory=list)
    stream: TextStream | None = None
    generator: torch.Generator | None = None
    cancelled: bool = False
    done: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
