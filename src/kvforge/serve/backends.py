"""Where the prefix store keeps its entries: in this process, in a directory, or in Redis (see
:mod:`kvforge.serve.store`), and the salted block hashes that index them."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import OrderedDict
from pathlib import Path

import torch

from ..state import KVState


def salt_seed(salt: str | None) -> bytes:
    """The digest a ``cache_salt`` seeds prefix hashes with (empty for no salt; the salt itself is never stored)."""
    if salt is None:
        return b""
    return hashlib.sha256(b"kvforge-cache-salt\0" + salt.encode()).digest()


def block_hashes(token_ids: list[int], block: int, upto: int | None = None, seed: bytes = b"") -> list[str]:
    """``h[i]`` names ``token_ids[:(i + 1) * block]`` (a chained SHA-256 over whole blocks, ``upto`` tokens at
    most), seeded with a salt's digest (:func:`salt_seed`): the same tokens under another salt hash apart."""
    n = len(token_ids) if upto is None else min(upto, len(token_ids))
    out, h = [], seed
    ids = torch.tensor(token_ids[: n - n % block], dtype=torch.int64).numpy()
    for i in range(0, len(ids), block):
        h = hashlib.sha256(h + ids[i : i + block].tobytes()).digest()
        out.append(h.hex()[:32])
    return out


# ------------------------------------------------------------------------------------------ backends
class _HitCounts:
    """Hit counts kept in this process (the memory and directory backends; Redis keeps its own)."""

    _hits: dict[str, int]

    def hit(self, key: str) -> None:
        self._hits[key] = self._hits.get(key, 0) + 1

    def hits(self, key: str) -> int:
        return self._hits.get(key, 0)


class MemoryBackend(_HitCounts):
    """Entries in this process: the ``KVState`` objects themselves (they were checked when made)."""

    name = "memory"

    def __init__(self):
        self._entries: OrderedDict[str, tuple[KVState, int]] = OrderedDict()  # LRU order, oldest first
        self._blocks: dict[str, str] = {}
        self._pinned: set[str] = set()
        self._hits: dict[str, int] = {}

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
        self._pinned.discard(key)
        self._hits.pop(key, None)
        for h in [h for h, k in self._blocks.items() if k == key]:
            del self._blocks[h]

    def total_bytes(self) -> int:
        return sum(n for _, n in self._entries.values())

    def by_age(self) -> list[str]:
        """Entry keys, least recently used first."""
        return list(self._entries)

    def info(self, key: str) -> tuple[int, int] | None:
        """``(tokens, bytes)`` of an entry, or ``None``."""
        item = self._entries.get(key)
        return None if item is None else (item[0].num_tokens, item[1])

    def pinned(self) -> set[str]:
        return set(self._pinned)

    def set_pinned(self, key: str, on: bool) -> None:
        (self._pinned.add if on else self._pinned.discard)(key)

    def __len__(self) -> int:
        return len(self._entries)


class DirectoryBackend(_HitCounts):
    """One ``<key>.kv`` file per entry (``KVState.save``); LRU order by modification time."""

    name = "directory"

    def __init__(self, root: str | Path, namespace: str, block: int):
        self.root = Path(root) / namespace
        self.root.mkdir(parents=True, exist_ok=True)
        self.block = block
        self._blocks: dict[str, str] = {}
        self._sizes: dict[str, int] = {}
        self._tokens: dict[str, int] = {}
        self._hits: dict[str, int] = {}
        for path in sorted(self.root.glob("*.kv"), key=lambda p: p.stat().st_mtime):
            try:
                ids, seed = _index_of_file(path)
            except Exception:  # noqa: BLE001 - an unreadable file is not an entry; loading it would fail too
                continue
            self._sizes[path.stem] = path.stat().st_size
            self._tokens[path.stem] = len(ids)
            for h in block_hashes(ids, block, seed=seed):
                self._blocks[h] = path.stem
        pins = self.root / "pinned.json"
        self._pinned = set(json.loads(pins.read_text())) & set(self._sizes) if pins.exists() else set()

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
        self._tokens[key] = state.num_tokens
        for h in hashes:
            self._blocks[h] = key

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)
        self._sizes.pop(key, None)
        self._tokens.pop(key, None)
        self._hits.pop(key, None)
        if key in self._pinned:
            self.set_pinned(key, False)
        for h in [h for h, k in self._blocks.items() if k == key]:
            del self._blocks[h]

    def total_bytes(self) -> int:
        return sum(self._sizes.values())

    def by_age(self) -> list[str]:
        paths = [self._path(k) for k in self._sizes if self._path(k).exists()]
        return [p.stem for p in sorted(paths, key=lambda p: p.stat().st_mtime)]

    def info(self, key: str) -> tuple[int, int] | None:
        return (self._tokens[key], self._sizes[key]) if key in self._sizes else None

    def pinned(self) -> set[str]:
        return set(self._pinned)

    def set_pinned(self, key: str, on: bool) -> None:
        (self._pinned.add if on else self._pinned.discard)(key)
        tmp = self.root / "pinned.json.tmp"
        tmp.write_text(json.dumps(sorted(self._pinned)))
        tmp.replace(self.root / "pinned.json")

    def __len__(self) -> int:
        return len(self._sizes)


def _index_of_file(path: Path) -> tuple[list[int], bytes]:
    """A stored entry's token ids and salt seed, read without loading its tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = json.loads((f.metadata() or {})["kvforge"])
        return f.get_tensor("token_ids")[0].tolist(), bytes.fromhex(header.get("meta", {}).get("cache_salt", ""))


class RedisBackend:
    """Entries in Redis, shared by every server that points at it.

    Keys under ``kvforge:prefix:<namespace>:``: ``e:<key>`` the entry's bytes (``KVState.to_bytes``),
    ``blocks`` a hash from block hash to entry key, ``lru`` a sorted set of entry keys by last use,
    ``sizes`` and ``tokens`` hashes of entry sizes and lengths, ``hits`` a hash of hit counts, ``pinned`` a set.
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
        p.hset(self._k("tokens"), key, state.num_tokens)
        p.zadd(self._k("lru"), {key: time.time()})
        if hashes:
            p.hset(self._k("blocks"), mapping=dict.fromkeys(hashes, key))
        p.execute()

    def delete(self, key: str) -> None:
        p = self.client.pipeline()
        p.delete(self._k("e:" + key))
        for name in ("sizes", "tokens", "hits"):
            p.hdel(self._k(name), key)
        p.srem(self._k("pinned"), key)
        p.zrem(self._k("lru"), key)
        p.execute()
        # block hashes still naming this key are dropped when a lookup finds the entry gone

    def forget_blocks(self, hashes: list[str]) -> None:
        if hashes:
            self.client.hdel(self._k("blocks"), *hashes)

    def total_bytes(self) -> int:
        return sum(int(v) for v in self.client.hvals(self._k("sizes")))

    def by_age(self) -> list[str]:
        return [k.decode() for k in self.client.zrange(self._k("lru"), 0, -1)]

    def info(self, key: str) -> tuple[int, int] | None:
        size, tokens = self.client.hget(self._k("sizes"), key), self.client.hget(self._k("tokens"), key)
        return None if size is None else (int(tokens or 0), int(size))

    def pinned(self) -> set[str]:
        return {k.decode() for k in self.client.smembers(self._k("pinned"))}

    def set_pinned(self, key: str, on: bool) -> None:
        (self.client.sadd if on else self.client.srem)(self._k("pinned"), key)

    def hit(self, key: str) -> None:
        self.client.hincrby(self._k("hits"), key, 1)

    def hits(self, key: str) -> int:
        return int(self.client.hget(self._k("hits"), key) or 0)

    def __len__(self) -> int:
        return int(self.client.hlen(self._k("sizes")))


def check_location(location: str) -> None:
    """Refuse a store location that reads as a mistyped Redis address (``127.0.0.1:6379``, ``redis:/host``,
    another URL scheme): taken as a directory it would silently share nothing."""
    scheme = location.split("://", 1)[0].lower() if "://" in location else ""
    looks_like_host = re.fullmatch(r"[\w.-]+:\d+(/\d+)?", location) is not None
    if (scheme and scheme not in ("redis", "rediss", "unix")) or looks_like_host or (
            not scheme and location.lower().startswith(("redis:", "rediss:"))):
        raise ValueError(f"prefix store {location!r} is neither 'memory', a redis://HOST:PORT[/DB] URL nor a "
                         "directory (did you mean redis://...?)")


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
    check_location(location)
    return DirectoryBackend(location, namespace, block)
