"""Work an :class:`~kvforge.serve.engine.Engine` does besides serving requests: jobs on its thread between
steps (storing a prefix ahead of traffic) and a blocking ``generate`` for tests and scripts."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future

import torch

from .. import run
from ..state import KVState
from .request import Event, Request, SamplingParams


class EngineJobs:
    """Mixed into ``Engine`` (uses its model, spec, store, lock, job queue and thread)."""

    # ------------------------------------------------------------------------------ stored prefixes
    def call(self, fn: Callable, timeout: float = 600):
        """Run ``fn()`` on the engine's thread between steps (directly when the engine is not running)."""
        if self._thread is None:
            return fn()
        fut: Future = Future()
        with self._lock:
            self._jobs.append((fn, fut))
            self._lock.notify_all()
        return fut.result(timeout)

    def store_prefix(self, token_ids: list[int], salt: str | None = None, pin: bool = True) -> dict:
        """Prefill ``token_ids`` (cut to whole store blocks) and store the prefix under ``salt``, pinned by
        default: a prefix ready before traffic (``POST /v1/kv/prefixes``, ``kvforge serve --preload``).
        Returns the entry (id, tokens, bytes, hits, pinned). Raises ``ValueError`` with no store, or for a
        prefix too short to store or longer than the model's context."""
        if self.store is None:
            raise ValueError("this server has no prefix store (it was started with --no-store)")
        n = len(token_ids) // self.store.block * self.store.block
        if n < self.store.min_tokens:
            raise ValueError(f"a stored prefix needs at least {self.store.min_tokens} tokens (whole blocks of "
                             f"{self.store.block}); this one has {len(token_ids)}")
        if n > self.capacity:
            raise ValueError(f"this prefix has {n} tokens; the cache holds at most {self.capacity}")
        ids = torch.tensor([token_ids[:n]], device=self.device)

        @torch.inference_mode()
        def work():
            cache = self.spec.build(self.model)
            run.prefill(self.model, ids, cache, start=0, chunk_size=self.idle_chunk)
            return self.store.put(KVState.from_cache(cache, self.model, ids.cpu()), salt=salt, pin=pin)

        key = self.call(work)
        entry = next((e for e in self.store.entries() if e["id"] == key), None)
        if entry is None:
            raise ValueError("the prefix could not be stored (larger than the store's budget?)")
        return entry

    def generate(self, prompt_ids: list[int], params: SamplingParams, timeout: float = 600) -> tuple[str, list[int], Event]:
        """Submit one request and wait for it (for tests and scripts): ``(text, token_ids, final event)``."""
        done = threading.Event()
        pieces: list[str] = []
        last: list[Event] = []

        def on_event(e: Event) -> None:
            pieces.append(e.text)
            if e.finish_reason or e.error:
                last.append(e)
                done.set()

        req = Request(list(prompt_ids), params, on_event)
        self.submit(req)
        if not done.wait(timeout):
            self.cancel(req)
            raise TimeoutError(f"request {req.id} did not finish in {timeout}s")
        if last[0].error:
            raise RuntimeError(last[0].error)
        return "".join(pieces), list(req.generated), last[0]
