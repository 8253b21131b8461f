"""Distributed token buckets: one per API key, shared by every router through Redis.

A request costs ``prompt tokens + max_tokens`` (weights configurable) and is admitted when its
key's bucket holds that many tokens. The bucket lives in one Redis hash and is updated by one Lua
script, so concurrent routers never over-admit; it refills from Redis' own clock (``TIME``), so
routers with skewed clocks agree. Limits come per key, else per tier of keys, else a default.

Redis down: ``on_redis_error="open"`` (default) keeps serving from an in-process bucket with the
same semantics (per router), logging one ERROR per outage and an INFO on recovery; ``"closed"``
denies with a retry hint. Redis is probed again every ``retry_redis_after_s`` meanwhile, so a
dead Redis costs at most one short timeout per interval, never one per request.
References: rq's ``scripts.py`` (registered Lua scripts), the GCRA/token bucket of redis-cell.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, NamedTuple, cast

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from core.errors import InvalidRequest, Overloaded, TandemError, Unavailable
from router.circuit import CircuitBreaker, CircuitConfig

log = logging.getLogger(__name__)

BUCKET_KEY = "tandem:bucket:{key_id}"  # a hash: tokens, ts (µs of Redis TIME at last update)

# Decision.reason codes; Decision.to_error maps each to one typed error.
ADMITTED = "admitted"
RATE_LIMITED = "rate_limited"  # -> RESOURCE_EXHAUSTED with retry_after_s
OVER_CAPACITY = "over_capacity"  # -> INVALID_ARGUMENT: this request can never pass
LIMITER_UNAVAILABLE = "limiter_unavailable"  # fail-closed and Redis down -> UNAVAILABLE

TOKEN_BUCKET_LUA = """
-- Take ARGV[3] tokens from the bucket at KEYS[1] if it holds them, after refilling it from
-- Redis' clock. Atomic: no other command runs between the read and the write.
-- KEYS[1]  bucket hash: tokens (float), ts (integer microseconds of Redis TIME, last update)
-- ARGV[1]  capacity (tokens, > 0): a missing bucket is full
-- ARGV[2]  refill rate (tokens per second, > 0)
-- ARGV[3]  cost (tokens, 0..capacity)
-- ARGV[4]  TTL in milliseconds (time to refill from empty + margin): an expired bucket is full
-- Returns {allowed 1|0, tokens left as a string (Lua numbers reply as integers),
--          microseconds until cost tokens are there (0 when allowed)}
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2]) / 1000000
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tokens = capacity
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
if state[1] then
  -- max(0, ...): Redis' clock may step back (e.g. a failover to another host)
  local elapsed = math.max(0, now - tonumber(state[2]))
  tokens = math.min(capacity, tonumber(state[1]) + elapsed * rate)
end
if tokens >= cost then
  tokens = tokens - cost
  -- Explicit formats: the default number format (%.14g) would round the 16-digit timestamp.
  redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
             'ts', string.format('%.0f', now))
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return {1, string.format('%.17g', tokens), 0}
end
-- A denial changes nothing: the stored state already implies the refill.
return {0, string.format('%.17g', tokens), math.ceil((cost - tokens) / rate)}
"""


class BucketLimit(NamedTuple):
    """Burst size (also the largest request a key can ever make) and sustained tokens/s."""

    capacity: float
    refill_per_s: float


@dataclass(frozen=True)
class CostWeights:
    """Cost of a request = prompt * prompt_tokens + max_tokens * max_tokens, rounded up."""

    prompt: float = 1.0
    max_tokens: float = 1.0


def request_cost(prompt_tokens: int, max_tokens: int, weights: CostWeights = CostWeights()) -> int:
    """Tokens a request takes from its bucket: what it may make the backends process."""
    if prompt_tokens < 0 or max_tokens < 0:
        raise ValueError(f"token counts must be >= 0, got {prompt_tokens} and {max_tokens}")
    return math.ceil(weights.prompt * prompt_tokens + weights.max_tokens * max_tokens)


def _limits(raw: Mapping[str, BucketLimit | tuple[float, float]]) -> Mapping[str, BucketLimit]:
    out = {name: BucketLimit(*limit) for name, limit in raw.items()}
    for name, limit in out.items():
        if not (limit.capacity > 0 and limit.refill_per_s > 0):
            raise ValueError(f"limit {name!r}: capacity and refill_per_s must be > 0, got {limit}")
    return MappingProxyType(out)


# 32k tokens of burst lets through any request the default Limits accept (32 KiB of prompt).
DEFAULT_LIMIT = BucketLimit(32_768, 512)


@dataclass(frozen=True)
class RateLimitConfig:
    """Limits by tier and by key, the cost formula, and what to do while Redis is down."""

    default: BucketLimit = DEFAULT_LIMIT  # keys of no known tier
    tiers: Mapping[str, BucketLimit | tuple[float, float]] = field(default_factory=lambda: {
        "free": BucketLimit(4_096, 32),
        "standard": BucketLimit(32_768, 512),
        "pro": BucketLimit(131_072, 4_096),
    })
    keys: Mapping[str, BucketLimit | tuple[float, float]] = field(default_factory=dict)
    cost: CostWeights = CostWeights()
    on_redis_error: Literal["open", "closed"] = "open"
    # While Redis is down one request probes it this often; the rest skip it (no stalls).
    retry_redis_after_s: float = 1.0
    # Share of each key's refill rate one router grants alone while Redis is down: 1/routers
    # keeps the fleet's sustained rate (bursts stay per router, so any valid request fits).
    local_rate_share: float = 1.0
    # Bucket keys expire this long after they would be full again (they read as full anyway).
    ttl_margin_s: float = 60.0
    key_template: str = BUCKET_KEY

    def __post_init__(self) -> None:
        object.__setattr__(self, "default", _limits({"default": self.default})["default"])
        object.__setattr__(self, "tiers", _limits(self.tiers))
        object.__setattr__(self, "keys", _limits(self.keys))
        if self.on_redis_error not in ("open", "closed"):
            raise ValueError(f"on_redis_error must be 'open' or 'closed', got "
                             f"{self.on_redis_error!r}")
        if self.retry_redis_after_s <= 0:
            raise ValueError(f"retry_redis_after_s must be > 0, got {self.retry_redis_after_s}")
        if not 0 < self.local_rate_share <= 1:
            raise ValueError(f"local_rate_share must be in (0, 1], got {self.local_rate_share}")
        if "{key_id}" not in self.key_template:
            raise ValueError(f"key_template must contain {{key_id}}, got {self.key_template!r}")

    def limit_for(self, key_id: str, tier: str | None = None) -> BucketLimit:
        """The key's own limit, else its tier's, else the default."""
        limit = self.keys.get(key_id) or self.tiers.get(tier or "") or self.default
        return cast(BucketLimit, limit)  # __post_init__ made every entry a BucketLimit


@dataclass(frozen=True)
class Decision:
    """Admitted or not; ``retry_after_s`` is None when waiting can never help."""

    allowed: bool
    remaining: float | None  # tokens left in the bucket (None: not looked up)
    retry_after_s: float | None  # 0 when allowed; seconds until enough tokens are back
    reason: str = ADMITTED
    source: str = "redis"  # which bucket decided: "redis", "local" or "" (none)
    message: str = ""

    def to_error(self) -> TandemError | None:
        """The typed error a servicer raises for a denial (None when allowed)."""
        if self.allowed:
            return None
        if self.reason == OVER_CAPACITY:
            return InvalidRequest(self.message)
        if self.reason == LIMITER_UNAVAILABLE:
            return Unavailable(self.message, retry_after_s=self.retry_after_s)
        return Overloaded(self.message, retry_after_s=self.retry_after_s)


def _decision(allowed: bool, tokens: float, wait_s: float, cost: int, source: str) -> Decision:
    if allowed:
        return Decision(True, tokens, 0.0, ADMITTED, source)
    return Decision(
        False, tokens, wait_s, RATE_LIMITED, source,
        f"rate limit: this request costs {cost} tokens (prompt + max_tokens) and the key has "
        f"{tokens:.0f} now; retry in {wait_s:.2f} s or ask for fewer max_tokens",
    )


class LocalTokenBucket:
    """In-process buckets with the Redis script's semantics: the fallback, and a baseline."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float, float]] = {}  # key -> tokens, ts, full_at
        self._calls = 0

    def __len__(self) -> int:
        return len(self._buckets)

    def try_acquire(self, key_id: str, limit: BucketLimit, cost: int) -> Decision:
        """Take ``cost`` tokens if the key's bucket holds them (``cost`` <= capacity)."""
        now = self._clock()
        tokens = limit.capacity
        if (state := self._buckets.get(key_id)) is not None:
            tokens = min(limit.capacity, state[0] + max(0.0, now - state[1]) * limit.refill_per_s)
        if tokens < cost:
            return _decision(False, tokens, (cost - tokens) / limit.refill_per_s, cost, "local")
        tokens -= cost
        self._buckets[key_id] = (tokens, now, now + (limit.capacity - tokens) / limit.refill_per_s)
        self._calls += 1
        if self._calls >= max(4096, len(self._buckets)):  # amortized O(1) per call
            self.prune(now)
        return _decision(True, tokens, 0.0, cost, "local")

    def prune(self, now: float | None = None) -> None:
        """Forget buckets that are full again (a missing bucket reads as full): bounded memory."""
        now = self._clock() if now is None else now
        self._buckets = {k: s for k, s in self._buckets.items() if s[2] > now}
        self._calls = 0

    def clear(self) -> None:
        self._buckets.clear()


def redis_client(url: str, timeout_s: float = 0.2) -> Redis:
    """An asyncio client that fails fast: short connect/read timeouts and no retries."""
    # A rate-limit decision must never stall a request: a dead Redis should cost one short
    # timeout, after which the limiter decides locally (or denies) and probes again later.
    return Redis.from_url(
        url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0), health_check_interval=0,
    )


class RateLimiter:
    """Token buckets per API key in Redis, with a local fallback (or a denial) when it is down."""

    def __init__(
        self, client: Redis, config: RateLimitConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.config = config or RateLimitConfig()
        self.local = LocalTokenBucket(clock)
        self._clock = clock
        self._script = client.register_script(TOKEN_BUCKET_LUA)
        # Opens on the first Redis error; half-open lets one probe through per interval.
        self._redis_circuit = CircuitBreaker(
            CircuitConfig(failure_threshold=1, cooloff_s=self.config.retry_redis_after_s), clock)
        self._down_since: float | None = None

    @property
    def redis_ok(self) -> bool:
        """False from the first Redis error until Redis answers again."""
        return self._down_since is None

    def bucket_key(self, key_id: str) -> str:
        return self.config.key_template.format(key_id=key_id)

    async def try_acquire(self, key_id: str, tier: str | None, cost: int) -> Decision:
        """Take ``cost`` tokens from the key's bucket, or say why not and when to retry."""
        if cost < 0:
            raise ValueError(f"cost must be >= 0, got {cost}")
        limit = self.config.limit_for(key_id, tier)
        if cost > limit.capacity:
            return Decision(
                False, None, None, OVER_CAPACITY, "",
                f"this request costs {cost} tokens (prompt + max_tokens) but this API key "
                f"allows at most {limit.capacity:.0f} per request; lower max_tokens or shorten "
                "the prompt",
            )
        if self._redis_circuit.try_acquire():
            try:
                allowed, tokens, wait_us = await self._script(
                    keys=[self.bucket_key(key_id)],
                    args=[repr(float(limit.capacity)), repr(float(limit.refill_per_s)), cost,
                          self._ttl_ms(limit)],
                )
            except (RedisError, OSError) as e:
                self._redis_circuit.record_failure()
                self._redis_failed(e)
            except BaseException:  # cancelled mid-call: no verdict on Redis either way
                self._redis_circuit.release()
                raise
            else:
                self._redis_circuit.record_success()
                if self._down_since is not None:
                    self._redis_recovered()
                return _decision(bool(allowed), float(tokens), int(wait_us) / 1e6, cost, "redis")
        return self._without_redis(key_id, limit, cost)

    def _ttl_ms(self, limit: BucketLimit) -> int:
        return math.ceil((limit.capacity / limit.refill_per_s + self.config.ttl_margin_s) * 1000)

    def _without_redis(self, key_id: str, limit: BucketLimit, cost: int) -> Decision:
        if self.config.on_redis_error == "closed":
            wait = self.config.retry_redis_after_s
            return Decision(False, None, wait, LIMITER_UNAVAILABLE, "",
                            f"the rate limiter cannot reach its store; retry in {wait:g} s")
        share = self.config.local_rate_share
        local = limit if share == 1 else BucketLimit(limit.capacity, limit.refill_per_s * share)
        return self.local.try_acquire(key_id, local, cost)

    def _redis_failed(self, error: Exception) -> None:
        if self._down_since is not None:
            return  # already said, once for this outage
        self._down_since = self._clock()
        what = ("each router enforces limits alone with local buckets (fail-open)"
                if self.config.on_redis_error == "open"
                else "every request is denied (fail-closed)")
        log.error("rate limiter: Redis unreachable (%s: %s); until it is back %s; retrying it "
                  "every %g s", type(error).__name__, error, what, self.config.retry_redis_after_s)

    def _redis_recovered(self) -> None:
        down_s = self._clock() - (self._down_since or 0.0)
        self._down_since = None
        self.local.clear()  # next outage starts from full buckets, as a restarted Redis does
        log.info("rate limiter: Redis is back after %.1f s; limits are shared again", down_s)
