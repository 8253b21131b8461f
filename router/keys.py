"""API keys in Redis: created once, stored only as a hash, verified per request through a TTL cache.

A key reads ``tdm_<key_id>_<secret>``, a ``core.tokens`` format. The id is public (it names the
key in logs, rate-limit buckets and ``tandem keys revoke``); only the secret authenticates, and
Redis holds nothing but its sha256 (or HMAC-sha256 with a server pepper, so a copy of Redis
alone can't be brute-forced offline). Each record lives under ``KEY_TEMPLATE`` with its name,
rate-limit tier, allowed routes, creation time and revocation flag; ``INDEX_KEY`` lists the ids
for ``list``.

``verify`` is on every request's path, so a verified key is remembered in-process for a few
seconds (``AuthConfig.cache_ttl_s``): a revocation takes effect within that time. This module
never imports grpc; ``router.auth`` turns its errors into statuses.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from cachetools import FIFOCache
from redis.exceptions import RedisError, WatchError

from core import tokens
from core.errors import Unauthenticated, Unavailable
from core.request import ROUTES

log = logging.getLogger(__name__)

KEY_TEMPLATE = "tandem:apikey:{key_id}"
INDEX_KEY = "tandem:apikeys"
TOKEN_PREFIX = "tdm"
_HOW = "send a key made by `tandem keys create` as gRPC metadata 'x-api-key'"

@dataclass(frozen=True)
class AuthConfig:
    """API key checking; ``enabled=False`` serves without keys (local development only)."""

    enabled: bool = True
    # HMAC key mixed into stored hashes; every router and `tandem keys` must use the same one,
    # and changing it invalidates every key made before.
    pepper: bytes | None = None
    # How long a verified key is trusted without asking Redis (and so how late a revocation
    # may take effect).
    cache_ttl_s: float = 5.0
    # With Redis unreachable, a key verified this recently is still let in (see verify).
    max_stale_s: float = 60.0
    cache_entries: int = 10_000
    # One Redis round trip of verify; past it the store counts as down (redis-py's own retries
    # can take seconds).
    redis_timeout_s: float = 0.5

    def __post_init__(self) -> None:
        if self.cache_ttl_s < 0 or self.max_stale_s < self.cache_ttl_s:
            raise ValueError("auth cache_ttl_s must be >= 0 and max_stale_s >= cache_ttl_s")
        if self.cache_entries < 0 or self.redis_timeout_s <= 0:
            raise ValueError("auth cache_entries must be >= 0 and redis_timeout_s > 0")


@dataclass(frozen=True)
class KeyRecord:
    """What Redis knows about one key (never the secret)."""

    key_id: str
    name: str
    tier: str
    routes: tuple[str, ...]
    created_at: float
    revoked: bool = False

    def allows(self, route: str) -> bool:
        return route in self.routes


# The key of the request being served: set by router.auth.ApiKeyInterceptor in the RPC's own
# task, read by the servicer and rate limiter (key_id for the bucket, tier for its limits).
CURRENT_KEY: ContextVar[KeyRecord | None] = ContextVar("tandem_current_key", default=None)


def current_key() -> KeyRecord | None:
    """The verified key of the RPC running in this task (None when auth is off)."""
    return CURRENT_KEY.get()


def _check_fields(name: str, tier: str, routes: Sequence[str]) -> tuple[str, ...]:
    if not name.strip() or len(name) > 100:
        raise ValueError(f"key name must be 1..100 characters, got {name!r}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", tier):
        raise ValueError(f"key tier must be 1..32 letters, digits, '_', '.' or '-', got {tier!r}")
    unknown = [r for r in routes if r not in ROUTES]
    if unknown or not routes:
        raise ValueError(f"routes must be a non-empty subset of {', '.join(ROUTES)}; "
                         f"got {', '.join(routes) or 'none'}")
    return tuple(r for r in ROUTES if r in routes)  # canonical order, no repeats


def _text(value: bytes | str) -> str:
    # The injected client may or may not have been made with decode_responses=True.
    return value.decode() if isinstance(value, bytes) else value


def _record(key_id: str, raw: dict[Any, Any]) -> KeyRecord:
    fields = {_text(k): _text(v) for k, v in raw.items()}
    return KeyRecord(
        key_id=key_id,
        name=fields["name"],
        tier=fields["tier"],
        routes=tuple(r for r in fields["routes"].split(",") if r),
        created_at=float(fields["created_at"]),
        revoked=fields.get("revoked", "0") == "1",
    )


@dataclass
class _Verified:
    record: KeyRecord
    digest: str
    at: float  # clock() when Redis last confirmed it


class KeyStore:
    """Create, list, revoke and verify API keys kept in Redis (the client is injected)."""

    def __init__(self, redis: aioredis.Redis, config: AuthConfig | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = redis
        self.config = config or AuthConfig()
        self.clock = clock
        # Oldest Redis confirmation out first: a hit within cache_ttl_s keeps its place (it
        # asked Redis nothing), a re-verify moves the key to the back: FIFOCache's order. Not
        # a TTLCache: one entry has two ages (fresh within cache_ttl_s, usable within
        # max_stale_s while Redis is down), both measured from _Verified.at.
        self._verified: FIFOCache[str, _Verified] = FIFOCache(self.config.cache_entries)
        self._down = False  # Redis failed last time: log once per outage, not per request
        self._redis_back_at = float("-inf")  # clock() before which Redis is not asked

    def _digest(self, secret: str) -> str:
        return tokens.digest(secret, self.config.pepper)

    async def create(self, name: str, tier: str = "default",
                     routes: Sequence[str] = ROUTES) -> tuple[str, str]:
        """A new key: returns ``(key_id, token)``; the token is shown once and never stored."""
        routes = _check_fields(name, tier, routes)
        while True:
            key_id, token, secret = tokens.new_token(TOKEN_PREFIX)
            key = KEY_TEMPLATE.format(key_id=key_id)
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(key)
                    if await pipe.exists(key):
                        continue  # 64-bit id collision: draw again
                    pipe.multi()
                    pipe.hset(key, mapping={
                        "name": name, "tier": tier, "routes": ",".join(routes),
                        "created_at": repr(time.time()), "revoked": "0",
                        "hash": self._digest(secret),
                    })
                    pipe.sadd(INDEX_KEY, key_id)
                    await pipe.execute()
                except WatchError:
                    continue
            log.info("created API key %s (%s, tier %s, routes %s)", key_id, name, tier,
                     ",".join(routes))
            return key_id, token

    async def list(self) -> list[KeyRecord]:
        """Every key, revoked ones included, oldest first; no secrets or hashes."""
        ids = sorted(_text(i) for i in await self.redis.smembers(INDEX_KEY))
        async with self.redis.pipeline(transaction=False) as pipe:
            for key_id in ids:
                pipe.hgetall(KEY_TEMPLATE.format(key_id=key_id))
            rows = await pipe.execute()
        records = [_record(i, f) for i, f in zip(ids, rows, strict=True) if f]
        return sorted(records, key=lambda r: r.created_at)

    async def revoke(self, key_id: str) -> bool:
        """Mark a key revoked (kept for the record); False when no such key exists."""
        key = KEY_TEMPLATE.format(key_id=key_id)
        if not await self.redis.exists(key):
            return False
        await self.redis.hset(key, mapping={"revoked": "1", "revoked_at": repr(time.time())})
        self._verified.pop(key_id, None)  # this process at least sees it at once
        log.info("revoked API key %s", key_id)
        return True

    async def verify(self, token: str | None) -> KeyRecord:
        """The record of a valid, unrevoked key; raises Unauthenticated (or Unavailable)."""
        if not token:
            raise Unauthenticated(f"missing API key: {_HOW}")
        parsed = tokens.parse_token(TOKEN_PREFIX, token.strip())
        if parsed is None:
            raise Unauthenticated(f"malformed API key (expected tdm_<id>_<secret>): {_HOW}")
        key_id, secret = parsed
        digest = self._digest(secret)
        now = self.clock()
        hit = self._verified.get(key_id)
        # The digest is compared even on a cache hit: a known id with a wrong secret gets nowhere.
        if hit and tokens.same_digest(hit.digest, digest):
            if now - hit.at <= self.config.cache_ttl_s:
                return hit.record
        else:
            hit = None
        try:
            if now < self._redis_back_at:
                raise ConnectionError("skipped: Redis failed less than a second ago")
            fields = await asyncio.wait_for(
                self.redis.hgetall(KEY_TEMPLATE.format(key_id=key_id)),
                self.config.redis_timeout_s)
        except (RedisError, OSError, TimeoutError) as e:
            if now >= self._redis_back_at:
                # Requests in the next second don't each wait out redis_timeout_s again.
                self._redis_back_at = self.clock() + 1.0
            self._outage(e)
            # Fail closed: without Redis only a key this process verified within max_stale_s
            # is let in (a revocation can't be written while Redis is down anyway). An unknown
            # key is never let in: its client gets UNAVAILABLE, not a free pass.
            if hit and now - hit.at <= self.config.max_stale_s:
                return hit.record
            raise Unavailable("cannot verify the API key right now (key store unreachable); "
                              "retry shortly", retry_after_s=1.0) from None
        if self._down:
            self._down = False
            log.warning("key store: Redis reachable again")
        if not fields:
            self._verified.pop(key_id, None)
            raise Unauthenticated(f"API key {key_id} is not recognized: check it was copied "
                                  f"whole, or ask for a new one ({_HOW})")
        stored = next((_text(v) for k, v in fields.items() if _text(k) == "hash"), "")
        if stored.partition(":")[0] != digest.partition(":")[0]:
            log.error("API key %s was hashed with %s but this router uses %s: configure the "
                      "same pepper everywhere", key_id, stored.partition(":")[0] or "nothing",
                      digest.partition(":")[0])
        # compare_digest: the time taken says nothing about how much of the hash matched. A wrong
        # secret leaves a cached entry alone (anyone knowing an id could otherwise evict it).
        if not tokens.same_digest(stored, digest):
            raise Unauthenticated(f"API key {key_id} is not recognized: check it was copied "
                                  f"whole, or ask for a new one ({_HOW})")
        record = _record(key_id, fields)
        if record.revoked:
            self._verified.pop(key_id, None)
            raise Unauthenticated(f"API key {key_id} was revoked; ask for a new one ({_HOW})")
        self._remember(key_id, _Verified(record, digest, now))
        return record

    def _outage(self, err: BaseException) -> None:
        if not self._down:
            self._down = True
            log.error("key store: Redis unreachable (%s); only keys verified in the last "
                      "%g s are accepted until it is back", str(err) or type(err).__name__,
                      self.config.max_stale_s)

    def _remember(self, key_id: str, entry: _Verified) -> None:
        if self.config.cache_entries == 0:
            return  # FIFOCache(0) refuses every entry
        self._verified[key_id] = entry  # evicts the oldest when full
