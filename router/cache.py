"""The response cache: a small in-process LRU in each router in front of Redis shared by all.

Exact match only. The key is a sha256 over the model version, the prompt exactly as sent and
every sampling parameter, under ``tandem:cache:{model_version}:{digest}``: a new model version
is a new namespace, and the old one's entries simply expire. Only reproducible requests (greedy,
or sampled with a fixed seed) whose client did not set ``no_cache`` get a key.

Normalization is limited to what can't change an answer. The prompt is NOT stripped, case-folded
or whitespace-collapsed, nor Unicode-normalized: the tokenizer is byte-level BPE with no
normalizer and the engines tokenize the text as given, so "Hi " and "Hi" are different token
sequences and may have different answers. What is normalized: for greedy requests (temperature
0) seed, top_k and top_p are dropped from the key, since argmax picks the same token whatever
they are (the top token always survives top-k and top-p). Stop sequences keep their order.

An entry's TTL grows with its hit count (``CacheConfig.ttl_tiers``, bounded by ``max_ttl_s``):
each hit in Redis bumps the count and restarts the TTL at its tier, atomically in one Lua script.
Hits served by the local LRU are counted there and added to Redis on the entry's next Redis read.
Redis trouble is a cache bypass (a miss, a skipped put), never an error; logged once per outage.
Nothing here imports grpc.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from cachetools import LRUCache
from redis.exceptions import RedisError

from core.engine_api import FINISH_REASONS, Chunk, ServedBy, Usage
from core.request import GenerationRequest

log = logging.getLogger(__name__)

KEY_TEMPLATE = "tandem:cache:{model_version}:{digest}"
FORMAT_VERSION = 1  # of the stored JSON and of the digest's input; bump to orphan old entries

# KEYS[1] the entry; ARGV[1] hits to add; ARGV[2..] ascending (min_hits, ttl_ms) pairs.
# Returns nil when absent, else {answer, hits, ttl_ms}. The TTL restarts at the tier of the new
# hit count, so an entry lives ttl(hits) past its last hit.
_GET_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return nil end
local hits = redis.call('HINCRBY', KEYS[1], 'hits', ARGV[1])
local ttl = 0
for i = 2, #ARGV, 2 do
  if hits >= tonumber(ARGV[i]) then ttl = tonumber(ARGV[i + 1]) end
end
redis.call('PEXPIRE', KEYS[1], ttl)
return {redis.call('HGET', KEYS[1], 'answer'), hits, ttl}
"""

# KEYS[1] the entry; ARGV[1] the answer JSON, ARGV[2] the first tier's ttl_ms. Returns 1 when
# stored, 0 when the entry already exists (another router stored the same answer: its hit count
# and TTL stay).
_PUT_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'answer', ARGV[1], 'hits', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""


@dataclass(frozen=True)
class CacheConfig:
    """Sizes and TTLs of both levels."""

    enabled: bool = True
    # (minimum hits, TTL seconds), ascending: an entry lives TTL past its last hit.
    ttl_tiers: tuple[tuple[int, float], ...] = ((0, 600.0), (3, 3600.0), (20, 6 * 3600.0),
                                                (100, 24 * 3600.0))
    max_ttl_s: float = 24 * 3600.0
    local_entries: int = 1024
    local_bytes: int = 32 * 1024 * 1024
    # A local entry is re-read from Redis after this long (that read carries its local hits).
    local_ttl_s: float = 30.0
    # Answers larger than this (serialized) are not cached.
    max_entry_bytes: int = 256 * 1024
    # One Redis round trip; past it the cache is bypassed (redis-py's own retries take seconds).
    redis_timeout_s: float = 0.2
    # After a Redis failure, skip Redis this long rather than make every request wait on it.
    retry_redis_after_s: float = 1.0

    def __post_init__(self) -> None:
        hits = [h for h, _ in self.ttl_tiers]
        if not self.ttl_tiers or hits[0] != 0 or hits != sorted(set(hits)):
            raise ValueError("cache ttl_tiers must start at 0 hits and ascend, e.g. "
                             "((0, 600), (3, 3600))")
        if any(t <= 0 for _, t in self.ttl_tiers) or self.max_ttl_s <= 0:
            raise ValueError("cache TTLs must be positive")
        if min(self.local_entries, self.local_bytes) < 0 or self.local_ttl_s < 0:
            raise ValueError("cache local_entries, local_bytes and local_ttl_s must be >= 0")

    def ttl_s(self, hits: int) -> float:
        """The TTL of an entry with ``hits`` hits."""
        ttl = next(t for h, t in reversed(self.ttl_tiers) if hits >= h)
        return min(ttl, self.max_ttl_s)


@dataclass(frozen=True)
class CachedAnswer:
    """A whole answer as first streamed: its chunks (boundaries kept) and who produced it."""

    chunks: tuple[Chunk, ...]  # the last has finish_reason and usage; timings are dropped
    served_by: ServedBy
    created_at: float = field(default_factory=time.time)

    @classmethod
    def from_chunks(cls, chunks: Sequence[Chunk], served_by: ServedBy) -> CachedAnswer:
        """From a finished stream; raises ValueError for a partial one (never cached)."""
        if not chunks or chunks[-1].finish_reason not in FINISH_REASONS:
            raise ValueError("only a finished answer can be cached (no finish_reason)")
        if any(c.finish_reason is not None for c in chunks[:-1]):
            raise ValueError("a cached answer ends at its only finish_reason")
        # Timings described the original serving, not a replay; the servicer sets its own.
        return cls(tuple(Chunk(c.text, tuple(c.token_ids), c.finish_reason, c.usage)
                         for c in chunks), served_by)

    @property
    def text(self) -> str:
        return "".join(c.text for c in self.chunks)

    @property
    def token_ids(self) -> tuple[int, ...]:
        return tuple(t for c in self.chunks for t in c.token_ids)

    @property
    def finish_reason(self) -> str:
        return self.chunks[-1].finish_reason or ""

    @property
    def usage(self) -> Usage | None:
        return self.chunks[-1].usage

    def to_json(self) -> bytes:
        u = self.usage
        return json.dumps({
            "v": FORMAT_VERSION,
            "chunks": [[c.text, list(c.token_ids)] for c in self.chunks],
            "finish_reason": self.finish_reason,
            "usage": [u.prompt_tokens, u.completion_tokens] if u else None,
            "served_by": [self.served_by.tier, self.served_by.node_id,
                          self.served_by.model_version],
            "created_at": self.created_at,
        }, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> CachedAnswer:
        # JSON, never pickle: the store is shared, and unpickling runs code.
        d = json.loads(data)
        if d.get("v") != FORMAT_VERSION:
            raise ValueError(f"cache entry format {d.get('v')}, expected {FORMAT_VERSION}")
        usage = Usage(*d["usage"]) if d["usage"] else None
        raw = d["chunks"]
        chunks = tuple(
            Chunk(text, tuple(ids), d["finish_reason"] if i == len(raw) - 1 else None,
                  usage if i == len(raw) - 1 else None)
            for i, (text, ids) in enumerate(raw))
        return cls(chunks, ServedBy(*d["served_by"]), d["created_at"])


def cacheable(req: GenerationRequest) -> bool:
    """Same request, same answer (greedy or seeded), and the client allows the cache."""
    return req.reproducible and not req.no_cache


def cache_key(req: GenerationRequest, model_version: str) -> str | None:
    """The Redis key of ``req``'s answer by model ``model_version``; None if not cacheable."""
    if not cacheable(req):
        return None
    greedy = req.greedy
    fields: dict[str, Any] = {
        "v": FORMAT_VERSION,
        "model_version": model_version,
        "prompt": req.prompt,  # exactly as sent: see the module docstring
        # A conversation as sent: the model version fixes its chat template, so equal messages
        # render to equal prompts on every tier (and the router needs no template to key them).
        "messages": [[m.role, m.content] for m in req.messages],
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        # Greedy decoding ignores these (argmax survives any top-k / top-p filter).
        "top_p": None if greedy else req.top_p,
        "top_k": None if greedy else req.top_k,
        "seed": None if greedy else req.seed,
        "stop": list(req.stop),
    }
    # ensure_ascii escapes lone surrogates too, so every prompt has one canonical encoding.
    blob = json.dumps(fields, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    digest = hashlib.sha256(blob.encode()).hexdigest()
    return KEY_TEMPLATE.format(model_version=model_version, digest=digest)


@dataclass
class CacheStats:
    """Counters for metrics: where lookups were answered, and Redis trouble."""

    local_hits: int = 0
    redis_hits: int = 0
    misses: int = 0
    puts: int = 0
    bypasses: int = 0  # lookups or puts that skipped a failing Redis


@dataclass
class _Local:
    answer: CachedAnswer
    size: int
    expires_at: float
    pending_hits: int = 0  # local hits not yet added to the count in Redis


class ResponseCache:
    """Two-level response cache; ``get``/``put`` never raise for Redis trouble."""

    def __init__(self, redis: aioredis.Redis | None, config: CacheConfig | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = redis
        self.config = config or CacheConfig()
        self.clock = clock
        self.stats = CacheStats()
        # Least recently used out first; cachetools bounds the bytes, _remember the entries.
        # An entry's own TTL stays in _Local: an expired entry still carries its pending hits
        # to Redis, which a cache that forgets expired entries (TLRUCache) would lose.
        self._local: LRUCache[str, _Local] = LRUCache(self.config.local_bytes,
                                                      getsizeof=_entry_size)
        self._redis_back_at = 0.0  # clock() before which Redis is skipped
        self._down = False
        tiers = [x for h, t in self.config.ttl_tiers
                 for x in (h, round(min(t, self.config.max_ttl_s) * 1000))]
        self._tier_args = tiers
        self._get_script = redis.register_script(_GET_LUA) if redis is not None else None
        self._put_script = redis.register_script(_PUT_LUA) if redis is not None else None

    async def get(self, key: str) -> CachedAnswer | None:
        """The cached answer under ``key``, from the local LRU or Redis; None on a miss."""
        if not self.config.enabled:
            return None
        now = self.clock()
        entry = self._local.get(key)
        pending = 0
        if entry is not None:
            if now < entry.expires_at:
                entry.pending_hits += 1
                self.stats.local_hits += 1
                return entry.answer
            pending = entry.pending_hits
            del self._local[key]
        found = await self._redis_get(key, pending + 1)
        if found is None:
            self.stats.misses += 1
            return None
        answer, size, ttl_s = found
        self.stats.redis_hits += 1
        self._remember(key, answer, size, min(ttl_s, self.config.local_ttl_s))
        return answer

    async def put(self, key: str, answer: CachedAnswer) -> bool:
        """Store a finished answer in both levels; False when it was not stored in Redis."""
        if not self.config.enabled:
            return False
        if not answer.chunks or answer.chunks[-1].finish_reason not in FINISH_REASONS:
            # A caller's bug, but the client's answer must not fail because of the cache.
            log.error("refusing to cache %s: the answer is not finished", key)
            return False
        blob = answer.to_json()
        if len(blob) > self.config.max_entry_bytes:
            return False
        self._remember(key, answer, len(blob),
                       min(self.config.ttl_s(0), self.config.local_ttl_s))
        stored = await self._redis_call(self._put_script, key,
                                        [blob, self._tier_args[1]]) if self._put_script else None
        if stored:
            self.stats.puts += 1
        return bool(stored)

    def clear_local(self) -> None:
        """Forget the in-process level (benchmarks; a router starting over)."""
        self._local.clear()

    @property
    def _local_bytes(self) -> int:
        """Serialized bytes held by the local level."""
        return int(self._local.currsize)

    # -- Redis ---------------------------------------------------------------------------------

    async def _redis_get(self, key: str, hits: int) -> tuple[CachedAnswer, int, float] | None:
        if self._get_script is None:
            return None
        reply = await self._redis_call(self._get_script, key, [hits, *self._tier_args])
        if not reply:
            return None
        blob, _, ttl_ms = reply
        try:
            return CachedAnswer.from_json(blob), len(blob), int(ttl_ms) / 1000
        except (ValueError, KeyError, TypeError) as e:
            # A foreign or corrupt entry is a miss; a fresh answer will be stored over it later.
            log.warning("cache entry %s unreadable (%s); treated as a miss", key, e)
            return None

    async def _redis_call(self, script: Any, key: str, args: list[Any]) -> Any:
        """Run a script, or None when Redis is failing (bypass: logged once per outage)."""
        if self.clock() < self._redis_back_at:
            self.stats.bypasses += 1
            return None
        try:
            reply = await asyncio.wait_for(script(keys=[key], args=args),
                                           self.config.redis_timeout_s)
        except (RedisError, OSError, TimeoutError) as e:
            self.stats.bypasses += 1
            self._redis_back_at = self.clock() + self.config.retry_redis_after_s
            if not self._down:
                self._down = True
                log.error("response cache: Redis unreachable (%s); bypassing the shared cache "
                          "until it is back", str(e) or type(e).__name__)
            return None
        if self._down:
            self._down = False
            log.warning("response cache: Redis reachable again")
        return reply

    # -- the local LRU -------------------------------------------------------------------------

    def _remember(self, key: str, answer: CachedAnswer, size: int, ttl_s: float) -> None:
        cfg = self.config
        if cfg.local_entries == 0 or size > cfg.local_bytes or ttl_s <= 0:
            return
        # Out first, so the new copy goes in as the most recent and evicts only others.
        self._local.pop(key, None)
        self._local[key] = _Local(answer, size, self.clock() + ttl_s)  # evicts to fit bytes
        while len(self._local) > cfg.local_entries:
            self._local.popitem()


def _entry_size(entry: _Local) -> int:
    return entry.size
