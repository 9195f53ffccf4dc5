"""The prefix store: KV states of prompt prefixes, kept in the server's cache format and reused.

A prefix is stored at a whole number of ``block`` tokens. Each block boundary ``k`` of a stored prefix is
indexed by a chained hash of ``tokens[:k]``, so a later prompt finds the longest stored prefix it starts
with by hashing its own blocks (one lookup per block, one round trip for Redis) and only its suffix is
prefilled. Entries live in a backend, within a byte budget, least recently used evicted first:

* :class:`MemoryBackend` (default): the states themselves, in this process;
* :class:`DirectoryBackend` (``--kv-store DIR``): one integrity-checked ``.kv`` file per entry; survives a
  restart (the index is rebuilt from the files' token ids);
* :class:`RedisBackend` (``--kv-store redis://HOST:PORT``): entries, block index and LRU order in Redis,
  so several server processes share prefixes.

Every entry is namespaced by the model fingerprint and the cache spec, and carries both in its own
metadata; a state whose fingerprint or spec differs from the server's is never used (it is dropped).

Tenants are kept apart by a per-request ``cache_salt`` (vLLM's field, after CVE-2025-46570: a shared prefix
cache lets one client time another's prompts). The salt's digest seeds the block-hash chain and the entry
key, and is recorded in the entry: a prefix stored under one salt is never found, and never used, for
another salt or for no salt, on every backend.

Pinned entries (``pin``; ``POST /v1/kv/prefixes``, ``kvforge serve --preload``) are never evicted; the
directory and Redis backends keep the pins across restarts.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

import torch

from ..models import fingerprint as model_fingerprint
from ..specs import parse_spec
from ..state import KVState, KVStateError
from .backends import DirectoryBackend, MemoryBackend, RedisBackend, block_hashes, open_backend, salt_seed

__all__ = ["DirectoryBackend", "MemoryBackend", "PrefixHit", "PrefixStore", "RedisBackend", "StoreStats",
           "block_hashes", "open_backend", "salt_seed"]


@dataclass
class StoreStats:
    hits: int = 0
    misses: int = 0
    puts: int = 0
    evictions: int = 0
    rejected: int = 0  # entries found but not usable (other model or spec, corrupted, missing)
    hit_tokens: int = 0


# ------------------------------------------------------------------------------------------ the store
@dataclass
class PrefixHit:
    state: KVState  # the stored prefix's state (exactly ``tokens`` tokens)
    tokens: int


class PrefixStore:
    """Prompt-prefix KV states of one model and cache spec, within ``max_bytes``.

    ``location``: ``None`` or ``"memory"``, a directory, or ``redis://HOST:PORT[/DB]``. ``block``: prefixes
    are stored and matched in whole blocks of this many tokens; ``min_tokens``: shorter prefixes are not
    worth storing.
    """

    def __init__(self, model, spec: str, location: str | None = None, max_bytes: int = 1 << 30,
                 block: int = 32, min_tokens: int = 64):
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        parse_spec(spec).check_restorable("the prefix store (serve with --no-store)")
        self.fingerprint = model_fingerprint(model)
        self.spec = str(spec)
        self.max_bytes = int(max_bytes)
        self.block = block
        self.min_tokens = max(min_tokens, block)
        spec_id = hashlib.sha256(self.spec.encode()).hexdigest()[:12]
        self.namespace = f"{self.fingerprint}-{spec_id}"
        self.backend = open_backend(location, self.namespace, block)
        self.stats = StoreStats()
        self._lock = threading.Lock()

    @property
    def location(self) -> str:
        return self.backend.name

    def lookup(self, token_ids: list[int], limit: int | None = None, salt: str | None = None) -> PrefixHit | None:
        """The longest prefix of ``token_ids`` stored under ``salt`` (at most ``limit`` tokens), or ``None``."""
        limit = len(token_ids) if limit is None else min(limit, len(token_ids))
        seed = salt_seed(salt)
        hashes = block_hashes(token_ids, self.block, upto=limit, seed=seed)
        with self._lock:
            keys = self.backend.lookup(hashes)
            tried = set()  # an entry unusable at one length is unusable at the shorter ones too
            for i in range(len(keys) - 1, -1, -1):
                key = keys[i]
                if key is None or key in tried:
                    continue
                tried.add(key)
                n = (i + 1) * self.block
                if n < self.min_tokens:
                    break
                state = self._usable(key, token_ids, n, hashes[: i + 1], seed)
                if state is not None:
                    self.stats.hits += 1
                    self.stats.hit_tokens += n
                    self.backend.hit(key)
                    return PrefixHit(state, n)
            self.stats.misses += 1
            return None

    def _usable(self, key: str, token_ids: list[int], n: int, hashes: list[str], seed: bytes) -> KVState | None:
        try:
            state = self.backend.get(key)
        except KVStateError:  # corrupted bytes or file: never used, and gone
            state = None
            self.backend.delete(key)
            self.stats.rejected += 1
        if state is None:
            if isinstance(self.backend, RedisBackend):
                self.backend.forget_blocks(hashes[-1:])
            return None
        if state.fingerprint != self.fingerprint or state.meta.get("cache_spec") != self.spec:
            self.backend.delete(key)
            self.stats.rejected += 1
            return None
        if state.meta.get("cache_salt", "") != seed.hex():
            return None  # another tenant's prefix: never used, whatever the hashes say
        if state.num_tokens < n or state.token_ids[0, :n].tolist() != list(token_ids[:n]):
            return None  # a hash collision or an overwritten key: not this prefix
        if state.num_tokens == n:
            return state
        part = state.select_tokens(0, n)
        try:
            part.check_complete()  # a sliding-window layer may not hold what the shorter prefix needs
        except KVStateError:
            return None
        return part

    def should_store(self, tokens: int, have: int) -> bool:
        """Store a ``tokens``-token prefix when it is block-aligned, long enough and longer than the hit."""
        return tokens >= self.min_tokens and tokens % self.block == 0 and tokens > have

    def holds(self, token_ids: list[int], salt: str | None = None) -> bool:
        """Whether an entry for exactly ``token_ids`` under ``salt`` is stored (no read, no check: a cheap test
        before storing the same prefix again)."""
        with self._lock:
            return self.backend.info(self._key(list(token_ids), salt_seed(salt))) is not None

    @staticmethod
    def _key(ids: list[int], seed: bytes) -> str:
        return hashlib.sha256(seed + torch.tensor(ids, dtype=torch.int64).numpy().tobytes()).hexdigest()[:32]

    def put(self, state: KVState, salt: str | None = None, pin: bool = False) -> str | None:
        """Store ``state`` (a block-aligned prefix, made with this store's model and spec) under ``salt``;
        returns its key, or ``None`` when it is larger than the whole budget. ``pin``: never evict it
        (raises ``ValueError`` when the pinned entries would no longer fit the budget)."""
        if state.fingerprint != self.fingerprint:
            raise KVStateError(f"this store holds states of model {self.fingerprint}, not {state.fingerprint}")
        seed = salt_seed(salt)
        state.meta = {**state.meta, "cache_spec": self.spec, "cache_salt": seed.hex()}
        ids = state.token_ids[0].tolist()
        nbytes = state.nbytes + state.token_ids.numel() * 8
        if nbytes > self.max_bytes:
            if pin:
                raise ValueError(f"this prefix needs {nbytes:,} bytes, more than the store's budget {self.max_bytes:,}")
            return None
        key = self._key(ids, seed)
        with self._lock:
            if pin:
                self._check_pin_fits(nbytes, key)
            self.backend.put(key, state, nbytes, block_hashes(ids, self.block, seed=seed))
            if pin:
                self.backend.set_pinned(key, True)
            self.stats.puts += 1
            self._evict()
        return key

    def _check_pin_fits(self, nbytes: int, key: str) -> None:
        pinned = self.backend.pinned() - {key}
        held = sum(info[1] for k in pinned if (info := self.backend.info(k)) is not None)
        if held + nbytes > self.max_bytes:
            raise ValueError(f"pinning this prefix ({nbytes:,} bytes) would pin {held + nbytes:,} bytes, more than the "
                             f"store's budget {self.max_bytes:,}: unpin others or raise --store-bytes")

    def set_pinned(self, key: str, on: bool) -> bool:
        """Pin or unpin a stored entry; False when there is no such entry."""
        with self._lock:
            info = self.backend.info(key)
            if info is None:
                return False
            if on:
                self._check_pin_fits(info[1], key)
            self.backend.set_pinned(key, on)
            if not on:
                self._evict()
            return True

    def entries(self) -> list[dict]:
        """Every stored prefix, most recently used first: key, tokens, bytes, hits, pinned, salted."""
        with self._lock:
            pinned = self.backend.pinned()
            out = []
            for key in reversed(self.backend.by_age()):
                info = self.backend.info(key)
                if info is not None:
                    out.append({"id": key, "tokens": info[0], "bytes": info[1], "hits": self.backend.hits(key),
                                "pinned": key in pinned})
            return out

    def _evict(self) -> None:
        """Least recently used unpinned entries go until the store is within its budget."""
        if self.backend.total_bytes() <= self.max_bytes:
            return
        pinned = self.backend.pinned()
        for key in self.backend.by_age():
            if self.backend.total_bytes() <= self.max_bytes:
                break
            if key in pinned:
                continue
            self.backend.delete(key)
            self.stats.evictions += 1

    def nbytes(self) -> int:
        with self._lock:
            return self.backend.total_bytes()

    def __len__(self) -> int:
        with self._lock:
            return len(self.backend)
