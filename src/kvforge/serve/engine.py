"""The batching engine: one thread that runs the model for every request in flight.

Each iteration of :meth:`Engine._loop` feeds one chunk of prompt tokens (shared, in arrival order, by the
requests still reading their prompts), then runs one decode step for every request that is generating
(continuous batching: a request joins the decode batch as soon as its prompt is read and leaves as soon
as it finishes; nobody waits for anyone else to finish). Every request keeps its own cache, built from
the server's cache spec; the decode step runs them together through
:class:`~kvforge.serve.batch.BatchedCache`, and so do the prompt chunks read in one iteration (the passes
themselves are in :mod:`kvforge.serve.step`; the request types in :mod:`kvforge.serve.request`).

Prompts are prefilled in chunks (``prefill_chunk`` tokens while others are decoding, so running streams
keep flowing), starting after the longest prefix found in the prefix store; a block-aligned prefix of each
prompt is exported (``KVState.from_cache``, in the cache's own encoding) and stored for later requests.

Admission: a request reserves the KV bytes its prompt plus ``max_tokens`` will need under the spec
(measured once at start-up). While live reservations would pass ``max_kv_bytes`` new requests wait in a
queue of ``max_queue``; past that :meth:`Engine.submit` raises :class:`Overloaded` (the API answers 503).
"""

from __future__ import annotations

import itertools
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

import torch

from .. import run
from ..generate import _eos_ids
from ..models import text_config
from ..specs import cache_nbytes, parse_spec
from ..state import KVState
from . import step
from .jobs import EngineJobs
from .metrics import Metrics
from .request import Event, Overloaded, Request, RequestTooLarge, SamplingParams
from .text import TextStream

__all__ = ["Engine", "Event", "Overloaded", "Request", "RequestTooLarge", "SamplingParams"]


def _fixed_lengths(cache) -> list[int]:
    """The fixed sizes of a cache's full-attention layers (``get_max_length() > 0``; a sliding layer's
    window is not a limit on the context)."""
    out = []
    for layer in getattr(cache, "layers", []):
        n = layer.get_max_length() if hasattr(layer, "get_max_length") else -1
        if n and n > 0 and not getattr(layer, "is_sliding", False):
            out.append(int(n))
    return out


class Engine(EngineJobs):
    """Runs ``model`` for many requests at once (see the module docstring)."""

    def __init__(self, model, tokenizer, spec: str = "dynamic", store=None, max_kv_bytes: int | None = None,
                 max_queue: int = 64, max_batch: int = 32, prefill_chunk: int = 256, idle_chunk: int = 2048,
                 metrics: Metrics | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.spec = parse_spec(spec)
        self.spec.build(model)  # fail now on a spec this model cannot use (and install its attention, if any)
        self.store = store
        self.max_kv_bytes = max_kv_bytes
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.idle_chunk = max(idle_chunk, prefill_chunk)
        self.metrics = metrics or Metrics()
        self.eos = set(_eos_ids(model, tokenizer))
        self.context = int(getattr(text_config(model), "max_position_embeddings", 0) or 1 << 20)
        # what one request can hold: the model's context, or less when the spec's cache has a fixed size
        self.capacity = min([self.context, *_fixed_lengths(self.spec.build(model))])
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._fixed, self._per_token, self._probe = self._measure_kv_bytes()

        self._lock = threading.Condition()
        self.waiting: deque[Request] = deque()  # not admitted yet (KV budget or batch size)
        self.prefilling: deque[Request] = deque()  # admitted, reading the prompt
        self.running: list[Request] = []  # generating
        self._stop = False
        self._thread: threading.Thread | None = None
        self._jobs: deque[tuple[Callable, Future]] = deque()  # work for the engine's thread between steps
        self.peak_kv_bytes = 0

    # ------------------------------------------------------------------------------ life cycle
    def start(self) -> Engine:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="kvforge-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    # ------------------------------------------------------------------------------ admission
    @torch.inference_mode()
    def _measure_kv_bytes(self) -> tuple[float, float, tuple[int, int]]:
        """KV bytes of a cache from the spec as ``fixed + per_token * n``, measured by filling two caches
        with ``n`` random tokens' keys and values (layer by layer; a model forward if that is not possible)."""
        cfg = text_config(self.model)
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        sizes = []
        for n in (min(256, max(1, self.capacity // 3)), min(768, self.capacity)):
            cache = self.spec.build(self.model)
            try:
                for i in range(len(cache.layers)):
                    kv = torch.randn(1, heads, n, dim, dtype=self.dtype, device=self.device)
                    cache.layers[i].update(kv, kv.clone())
            except Exception:  # noqa: BLE001 - a cache whose layers want more than keys and values
                cache = self.spec.build(self.model)
                run.prefill(self.model, torch.zeros(1, n, dtype=torch.long, device=self.device), cache, start=0)
            sizes.append((n, cache_nbytes(cache)))
        (n1, b1), (n2, b2) = sizes
        per_token = (b2 - b1) / max(1, n2 - n1) if n2 > n1 else b1 / n1
        return max(0.0, b1 - per_token * n1), per_token, (n1, b1)

    def kv_bytes_for(self, tokens: int) -> int:
        """An upper estimate of the KV bytes of ``tokens`` tokens in a cache built from the spec."""
        n1, b1 = self._probe
        return int(max(self._fixed + self._per_token * tokens, b1 * min(tokens, n1) / n1))

    def submit(self, req: Request) -> None:
        """Queue ``req``; raises :class:`RequestTooLarge` or :class:`Overloaded`."""
        need = len(req.prompt_ids) + req.params.max_tokens
        if need > self.capacity:
            raise RequestTooLarge(
                f"this request needs {need} tokens of cache ({len(req.prompt_ids)} prompt tokens + max_tokens "
                f"{req.params.max_tokens}); this server's cache holds at most {self.capacity} per request")
        req.reserved = self.kv_bytes_for(need)
        if self.max_kv_bytes is not None and req.reserved > self.max_kv_bytes:
            raise RequestTooLarge(
                f"this request needs about {req.reserved:,} bytes of KV cache ({len(req.prompt_ids)} prompt tokens "
                f"+ max_tokens {req.params.max_tokens}), more than this server's --max-kv-bytes {self.max_kv_bytes:,}"
            )
        with self._lock:
            self.waiting.append(req)
            self._admit()
            if req in self.waiting and len(self.waiting) > self.max_queue:
                self.waiting.remove(req)
                raise Overloaded(
                    f"the server's KV memory is in use and {self.max_queue} requests are already waiting; retry later"
                )
            self.metrics.set("requests_waiting", len(self.waiting))
            self.metrics.inc("prompt_tokens_total", len(req.prompt_ids))
            self._lock.notify_all()

    def cancel(self, req: Request) -> None:
        """Stop ``req`` (its client went away): its slot and cache are freed before the next step."""
        with self._lock:
            req.cancelled = True
            if req in self.waiting:
                self.waiting.remove(req)
                req.done = True
                self.metrics.inc("requests_total", status="cancelled")
            self._lock.notify_all()

    def _reserved(self) -> int:
        return sum(r.reserved for r in itertools.chain(self.prefilling, self.running))

    def _admit(self) -> None:
        """Move waiting requests (in order) into prefill while the budget and batch size allow. Holds the lock."""
        while self.waiting:
            req = self.waiting[0]
            active = len(self.prefilling) + len(self.running)
            fits = self.max_kv_bytes is None or self._reserved() + req.reserved <= self.max_kv_bytes
            if active and (not fits or active >= self.max_batch):
                return
            self.waiting.popleft()
            self.prefilling.append(req)

    @property
    def kv_bytes_held(self) -> int:
        return sum(r.kv_bytes for r in itertools.chain(list(self.prefilling), list(self.running)))

    # ------------------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self.prefilling and not self.running and not self._jobs:
                    self._lock.wait(timeout=1.0)
                if self._stop:
                    for r in [*self.waiting, *self.prefilling, *self.running]:
                        self._fail(r, "the server is shutting down")
                    for _, fut in self._jobs:
                        fut.set_exception(RuntimeError("the server is shutting down"))
                    return
                self._drop_cancelled()
                pending = list(self.prefilling)
                jobs, self._jobs = list(self._jobs), deque()
            for fn, fut in jobs:  # e.g. a prefix to store: the model runs on this thread only
                try:
                    fut.set_result(fn())
                except Exception as e:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(e)
            # prompts first, up to one chunk of tokens in all (shared in arrival order), then one decode step
            if pending:
                self._prefill(pending, self.prefill_chunk if self.running else self.idle_chunk)
            try:
                if self.running:
                    self._decode_step()
            except Exception as e:  # noqa: BLE001 - one bad step fails its requests, not the server
                traceback.print_exc()
                for r in list(self.running):
                    self._fail(r, f"{type(e).__name__}: {e}")
            with self._lock:
                self._admit()
                self.metrics.set("requests_waiting", len(self.waiting))
                self.metrics.set("requests_running", len(self.running) + len(self.prefilling))

    def _drop_cancelled(self) -> None:
        for queue in (self.prefilling, self.running):
            for r in [r for r in queue if r.cancelled]:
                queue.remove(r)
                self._release(r)
                r.done = True
                self.metrics.inc("requests_total", status="cancelled")

    def _release(self, r: Request) -> None:
        r.cache = None  # the request's cache goes now, not when its owner lets go of the request
        r.kv_bytes = 0

    def _start(self, r: Request) -> None:
        """Give ``r`` its cache, filled from the longest stored prefix of its prompt if there is one."""
        n = len(r.prompt_ids)
        r.cache = self.spec.build(self.model)
        if self.store is None:
            return
        hit = self._store_call(self.store.lookup, r.prompt_ids, limit=n - 1, salt=r.cache_salt)
        self.metrics.inc("prefix_hits_total" if hit else "prefix_misses_total")
        if hit is not None and self._store_call(hit.state.to_cache, self.model, r.cache) is not None:
            r.seen = r.prefix_tokens = hit.tokens
            self.metrics.inc("prefix_hit_tokens_total", hit.tokens)
        elif hit is not None:  # it could not be imported: start over from an empty cache
            r.cache = self.spec.build(self.model)
        at = (n - 1) // self.store.block * self.store.block
        r.store_at = at if self.store.should_store(at, r.prefix_tokens) else None

    @torch.inference_mode()
    def _prefill(self, pending: list[Request], budget: int) -> None:
        """Feed up to ``budget`` prompt tokens, in arrival order, to the requests reading their prompts.

        Their chunks go through the model in one batched pass (:func:`kvforge.serve.step.prefill`), unless
        padding would cost more than the real tokens; a request whose prompt is read gets its first token.
        """
        rows: list[tuple[Request, int]] = []
        for r in pending:
            if budget <= 0:
                break
            try:
                if r.cache is None:
                    self._start(r)
            except Exception as e:  # noqa: BLE001 - a failing request, not a failing server
                traceback.print_exc()
                self._fail(r, f"{type(e).__name__}: {e}")
                continue
            end = min(len(r.prompt_ids), r.seen + budget)
            if r.store_at is not None and r.seen < r.store_at:
                end = min(end, r.store_at)  # stop at the prefix to store, to export it as it is
            rows.append((r, end))
            budget -= end - r.seen
        if not rows:
            return
        sizes = [end - r.seen for r, end in rows]
        try:
            logits, passes = step.prefill(self.model, rows, self.device, self.dtype)
        except Exception as e:  # noqa: BLE001 - the pass failed: its requests fail, the server goes on
            traceback.print_exc()
            for r, _ in rows:
                self._fail(r, f"{type(e).__name__}: {e}")
            return
        self.metrics.inc("prefill_tokens_total", sum(sizes))
        self.metrics.inc("prefill_passes_total", passes)
        self.metrics.inc("prefill_rows_total", len(rows))
        for (r, end), lg in zip(rows, logits):
            try:
                self._prefilled(r, end, lg)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                self._fail(r, f"{type(e).__name__}: {e}")

    def _prefilled(self, r: Request, end: int, logits: torch.Tensor) -> None:
        """``r`` has read its prompt up to ``end``: store the prefix there, or start generating at the end."""
        r.seen = end
        if end == r.store_at:
            self._store_call(self.store.put, KVState.from_cache(r.cache, self.model, torch.tensor([r.prompt_ids[:end]])),
                             salt=r.cache_salt)
        r.kv_bytes = cache_nbytes(r.cache)
        if end < len(r.prompt_ids):
            return
        with self._lock:
            self.prefilling.remove(r)
            if r.cancelled:
                self._release(r)
                r.done = True
                self.metrics.inc("requests_total", status="cancelled")
                return
            self.running.append(r)
        r.stream = TextStream(self.tokenizer, r.params.stop)
        if r.params.seed is not None:
            r.generator = torch.Generator(device=self.device).manual_seed(r.params.seed)
        r.first_token_at = time.perf_counter()
        self.metrics.observe("time_to_first_token_seconds", r.first_token_at - r.submitted)
        self._accept(r, self._sample(r, logits))

    def _store_call(self, fn, *args, **kwargs):
        """A prefix-store call that cannot fail a request: a store that is down is a miss."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - Redis or disk errors: serve without the store
            self.metrics.inc("prefix_store_errors_total")
            print(f"kvforge serve: prefix store error ({type(e).__name__}: {e}); serving without it")
            return None

    @torch.inference_mode()
    def _decode_step(self) -> None:
        rows = [r for r in self.running if not r.done]
        if not rows:
            return
        logits = step.decode(self.model, rows, self.device, self.dtype)
        self.metrics.inc("decode_steps_total")
        self.metrics.inc("decode_rows_total", len(rows))
        for i, r in enumerate(rows):
            r.seen += 1
            if len(r.generated) % 16 == 0:
                r.kv_bytes = cache_nbytes(r.cache)
            self._accept(r, self._sample(r, logits[i : i + 1]))
        held = self.kv_bytes_held
        self.peak_kv_bytes = max(self.peak_kv_bytes, held)
        self.metrics.set("kv_bytes_held", held)
        self.metrics.set("kv_bytes_peak", self.peak_kv_bytes)

    def _sample(self, r: Request, logits: torch.Tensor) -> int:
        p = r.params
        return int(run.sample_next(logits, p.temperature, p.top_p, r.generator)[0])

    def _accept(self, r: Request, token: int) -> None:
        r.generated.append(token)
        self.metrics.inc("generated_tokens_total")
        if token in self.eos:
            return self._finish(r, "stop", r.stream.flush())
        text = r.stream.add(token)
        if r.stream.stopped:
            return self._finish(r, "stop", text)
        if len(r.generated) >= r.params.max_tokens or r.seen + 1 >= self.context:
            return self._finish(r, "length", text + r.stream.flush())
        if text:
            self._emit(r, Event(text=text, token_ids=[token]))

    def _emit(self, r: Request, event: Event) -> None:
        """Hand ``event`` to the request's owner; an owner that is gone cancels its request, nobody else's."""
        try:
            r.on_event(event)
        except Exception:  # noqa: BLE001 - e.g. the owner's event loop has closed
            r.cancelled = True

    def _usage(self, r: Request) -> dict:
        n = len(r.prompt_ids)
        return {"prompt_tokens": n, "completion_tokens": len(r.generated), "total_tokens": n + len(r.generated),
                "prompt_tokens_details": {"cached_tokens": r.prefix_tokens}}

    def _finish(self, r: Request, reason: str, text: str = "") -> None:
        with self._lock:
            if r in self.running:
                self.running.remove(r)
            r.done = True
            self._release(r)
        self.metrics.inc("requests_total", status="ok")
        self._emit(r, Event(text=text, finish_reason=reason, usage=self._usage(r)))

    def _fail(self, r: Request, message: str) -> None:
        with self._lock:
            for queue in (self.waiting, self.prefilling, self.running):
                if r in queue:
                    queue.remove(r)
            r.done = True
            self._release(r)
        self.metrics.inc("requests_total", status="error")
        self._emit(r, Event(error=message))
