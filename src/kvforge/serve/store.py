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
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models import fingerprint as model_fingerprint
from ..specs import parse_spec
from ..state import KVState, KVStateError


def block_hashes(token_ids: list[int], block: int, upto: int | None = None) -> list[str]:
    """``h[i]`` names ``token_ids[:(i + 1) * block]`` (a chained SHA-256 over whole blocks, ``upto`` tokens at most)."""
    n = len(token_ids) if upto is None else min(upto, len(token_ids))
    out, h = [], b""
    ids = torch.tensor(token_ids[: n - n % block], dtype=torch.int64).numpy()
    for i in range(0, len(ids), block):
        h = hashlib.sha256(h + ids[i : i + block].tobytes()).digest()
        out.append(h.hex()[:32])
    return out


@dataclass
class StoreStats:
    hits: int = 0
    misses: int = 0
    puts: int = 0
    evictions: int = 0
    rejected: int = 0  # entries found but not usable (other model or spec, corrupted, missing)
    hit_tokens: int = 0


# ------------------------------------------------------------------------------------------ backends
class MemoryBackend:
    """Entries in this process: the ``KVState`` objects themselves (they were checked when made)."""

    name = "memory"

    def __init__(self):
        self._entries: OrderedDict[str, tuple[KVState, int]] = OrderedDict()  # LRU order, oldest first
        self._blocks: dict[str, str] = {}

    def lookup(self, hashes: list[str]) -> list[str | None]:
        return [self._blocks.get(h) for h in hashes]

    def get(self, key: str) -> KVState | None:
        item = self._entries.get(key)
        if item is None:
            return None
        self._entries.move_to_end(key)
        return item[0]

    def put(self, key: str, state: KVState, nbytes: int, hashes: list[str]) -> None:
        self._entries[key] = (state, nbytes)
        self._entries.move_to_end(key)
        for h in hashes:
            self._blocks[h] = key

    def delete(self, key: str) -> None:
        self._entries.pop(key, None)
        for h in [h for h, k in self._blocks.items() if k == key]:
            del self._blocks[h]

    def total_bytes(self) -> int:
        return sum(n for _, n in self._entries.values())

    def oldest(self) -> str | None:
        return next(iter(self._entries), None)

    def __len__(self) -> int:
        return len(self._entries)


class DirectoryBackend:
    """One ``<key>.kv`` file per entry (``KVState.save``); LRU order by modification time."""

    name = "directory"

    def __init__(self, root: str | Path, namespace: str, block: int):
        self.root = Path(root) / namespace
        self.root.mkdir(parents=True, exist_ok=True)
        self.block = block
        self._blocks: dict[str, str] = {}
        self._sizes: dict[str, int] = {}
        for path in sorted(self.root.glob("*.kv"), key=lambda p: p.stat().st_mtime):
            try:
                ids = _token_ids_of_file(path)
            except Exception:  # noqa: BLE001 - an unreadable file is not an entry; loading it would fail too
                continue
            self._sizes[path.stem] = path.stat().st_size
            for h in block_hashes(ids, block):
                self._blocks[h] = path.stem

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.kv"

    def lookup(self, hashes: list[str]) -> list[str | None]:
        return [self._blocks.get(h) for h in hashes]

    def get(self, key: str) -> KVState | None:
        path = self._path(key)
        if not path.exists():
            return None
        path.touch()
        return KVState.load(path)

    def put(self, key: str, state: KVState, nbytes: int, hashes: list[str]) -> None:
        path = state.save(self._path(key))
        self._sizes[key] = path.stat().st_size
        for h in hashes:
            self._blocks[h] = key

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)
        self._sizes.pop(key, None)
        for h in [h for h, k in self._blocks.items() if k == key]:
            del self._blocks[h]

    def total_bytes(self) -> int:
        return sum(self._sizes.values())

    def oldest(self) -> str | None:
        paths = [self._path(k) for k in self._sizes if self._path(k).exists()]
        return min(paths, key=lambda p: p.stat().st_mtime).stem if paths else None

    def __len__(self) -> int:
        return len(self._sizes)


def _token_ids_of_file(path: Path) -> list[int]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("token_ids")[0].tolist()


class RedisBackend:
    """Entries in Redis, shared by every server that points at it.

    Keys under ``kvforge:prefix:<namespace>:``: ``e:<key>`` the entry's bytes (``KVState.to_bytes``),
    ``blocks`` a hash from block hash to entry key, ``lru`` a sorted set of entry keys by last use,
    ``sizes`` a hash of entry sizes.
    """

    name = "redis"

    def __init__(self, url: str, namespace: str):
        import redis

        self.client = redis.Redis.from_url(url)
        self.client.ping()
        self.prefix = f"kvforge:prefix:{namespace}:"

    def _k(self, name: str) -> str:
        return self.prefix + name

    def lookup(self, hashes: list[str]) -> list[str | None]:
        if not hashes:
            return []
        return [None if v is None else v.decode() for v in self.client.hmget(self._k("blocks"), hashes)]

    def get(self, key: str) -> KVState | None:
        data = self.client.get(self._k("e:" + key))
        if data is None:
            return None
        self.client.zadd(self._k("lru"), {key: time.time()})
        return KVState.from_bytes(data, where=f"redis entry {key}")

    def put(self, key: str, state: KVState, nbytes: int, hashes: list[str]) -> None:
        data = state.to_bytes()
        p = self.client.pipeline()
        p.set(self._k("e:" + key), data)
        p.hset(self._k("sizes"), key, len(data))
        p.zadd(self._k("lru"), {key: time.time()})
        if hashes:
            p.hset(self._k("blocks"), mapping=dict.fromkeys(hashes, key))
        p.execute()

    def delete(self, key: str) -> None:
        p = self.client.pipeline()
        p.delete(self._k("e:" + key))
        p.hdel(self._k("sizes"), key)
        p.zrem(self._k("lru"), key)
        p.execute()
        # block hashes still naming this key are dropped when a lookup finds the entry gone

    def forget_blocks(self, hashes: list[str]) -> None:
        if hashes:
            self.client.hdel(self._k("blocks"), *hashes)

    def total_bytes(self) -> int:
        return sum(int(v) for v in self.client.hvals(self._k("sizes")))

    def oldest(self) -> str | None:
        got = self.client.zrange(self._k("lru"), 0, 0)
        return got[0].decode() if got else None

    def __len__(self) -> int:
        return int(self.client.hlen(self._k("sizes")))


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

    def lookup(self, token_ids: list[int], limit: int | None = None) -> PrefixHit | None:
        """The longest stored prefix of ``token_ids`` (at most ``limit`` tokens), or ``None`` (a miss)."""
        limit = len(token_ids) if limit is None else min(limit, len(token_ids))
        hashes = block_hashes(token_ids, self.block, upto=limit)
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
                state = self._usable(key, token_ids, n, hashes[: i + 1])
                if state is not None:
                    self.stats.hits += 1
                    self.stats.hit_tokens += n
                    return PrefixHit(state, n)
            self.stats.misses += 1
            return None

    def _usable(self, key: str, token_ids: list[int], n: int, hashes: list[str]) -> KVState | None:
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

    def put(self, state: KVState) -> None:
        """Store ``state`` (a block-aligned prefix, made with this store's model and spec)."""
        if state.fingerprint != self.fingerprint:
            raise KVStateError(f"this store holds states of model {self.fingerprint}, not {state.fingerprint}")
        state.meta = {**state.meta, "cache_spec": self.spec}
        ids = state.token_ids[0].tolist()
        nbytes = state.nbytes + state.token_ids.numel() * 8
        if nbytes > self.max_bytes:
            return
        key = hashlib.sha256(torch.tensor(ids, dtype=torch.int64).numpy().tobytes()).hexdigest()[:32]
        with self._lock:
            self.backend.put(key, state, nbytes, block_hashes(ids, self.block))
            self.stats.puts += 1
            self._evict()

    def _evict(self) -> None:
        while self.backend.total_bytes() > self.max_bytes:
            key = self.backend.oldest()
            if key is None:
                break
            self.backend.delete(key)
            self.stats.evictions += 1

    def nbytes(self) -> int:
        with self._lock:
            return self.backend.total_bytes()

    def __len__(self) -> int:
        with self._lock:
            return len(self.backend)


def open_backend(location: str | None, namespace: str, block: int):
    if location in (None, "", "memory"):
        return MemoryBackend()
    if location.startswith(("redis://", "rediss://", "unix://")):
        try:
            return RedisBackend(location, namespace)
        except ImportError as e:
            raise ValueError("a Redis prefix store needs the redis client: pip install 'kvforge[serve]'") from e
        except Exception as e:  # noqa: BLE001 - redis' connection errors; name the address
            raise ValueError(f"cannot reach the Redis prefix store at {location}: {e}") from e
    return DirectoryBackend(location, namespace, block)
