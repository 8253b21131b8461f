"""The router's front door on Redis: who may ask (API keys), how much (token buckets), and
answers already given (the response cache). Built once from config; the servicer calls it.

Without a Redis URL, keys and rate limits are off (development) and the cache is the router's
own in-process LRU. With one, every router replica shares keys, buckets and cached answers.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc

from core.engine_api import Chunk, ServedBy, Timings
from core.errors import InvalidRequest
from core.request import GenerationRequest
from router.auth import auth_interceptors
from router.cache import CacheConfig, CachedAnswer, ResponseCache, cache_key, cacheable
from router.calls import RoutedChunk
from router.keys import AuthConfig, KeyRecord, KeyStore
from router.ratelimit import RateLimitConfig, RateLimiter, redis_client, request_cost

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"  # the bucket of requests without a key (auth off)


@dataclass(frozen=True)
class FrontDoorConfig:
    redis_url: str | None = None
    auth: AuthConfig = field(default_factory=lambda: AuthConfig(enabled=False))
    # None turns rate limiting off.
    rate_limit: RateLimitConfig | None = field(default_factory=RateLimitConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    # tokenizer.json that counts prompt tokens for the cost; None estimates 4 bytes a token.
    tokenizer_dir: Path | None = None
    # A decision must never stall a request: a dead Redis costs one short timeout.
    redis_timeout_s: float = 0.25

    def __post_init__(self) -> None:
        if self.auth.enabled and not self.redis_url:
            raise ValueError("API keys need Redis: pass --redis-url, or turn auth off")


class FrontDoor:
    """Keys, limits and cache for one router process."""

    def __init__(self, config: FrontDoorConfig) -> None:
        self.config = config
        self.redis = (redis_client(config.redis_url, config.redis_timeout_s)
                      if config.redis_url else None)
        self.keys = (KeyStore(self.redis, config.auth)
                     if self.redis is not None and config.auth.enabled else None)
        self.limiter = (RateLimiter(self.redis, config.rate_limit)
                        if self.redis is not None and config.rate_limit is not None else None)
        self.cache = ResponseCache(self.redis, config.cache)
        self._tokenizer = None
        if config.tokenizer_dir is not None:
            from model.tokenizer import Tokenizer

            self._tokenizer = Tokenizer.from_dir(config.tokenizer_dir)
        log.info("front door: keys %s, rate limits %s, cache %s",
                 "on" if self.keys else "off", "on" if self.limiter else "off",
                 ("shared in Redis" if self.redis else "local") if config.cache.enabled else "off")

    def interceptors(
        self, on_reject: Callable[[str, str], None] | None = None
    ) -> list[grpc.aio.ServerInterceptor]:
        """The key gate (none when auth is off); ``on_reject(method, status)`` counts refusals."""
        return auth_interceptors(self.config.auth, self.keys, on_reject)

    def prompt_text(self, req: GenerationRequest) -> str | None:
        """The prompt the model will read (a conversation rendered with the tokenizer's chat
        template), or None when the router has no template to render it with."""
        if not req.messages:
            return req.prompt
        if self._tokenizer is None or self._tokenizer.chat_template is None:
            return None
        try:
            return self._tokenizer.prompt_text(req.prompt, req.messages)
        except InvalidRequest:
            return None  # the tier's own rendering will say what is wrong

    def prompt_bytes(self, req: GenerationRequest) -> int:
        """UTF-8 size of the prompt as the model reads it (estimated without a template)."""
        text = self.prompt_text(req)
        return req.prompt_bytes if text is None else len(text.encode("utf-8", "surrogatepass"))

    def prompt_tokens(self, req: GenerationRequest) -> int:
        """Tokens of the prompt as the model reads it; 4 bytes a token without a tokenizer."""
        text = self.prompt_text(req)
        if self._tokenizer is not None and text is not None:
            return self._tokenizer.token_count(text)
        return math.ceil(self.prompt_bytes(req) / 4)

    async def admit(self, req: GenerationRequest, key: KeyRecord | None) -> None:
        """Charge the request to its key's bucket; raises the limiter's typed error."""
        if self.limiter is None:
            return
        weights = self.limiter.config.cost
        cost = request_cost(self.prompt_tokens(req), req.max_tokens, weights)
        key_id, tier = (key.key_id, key.tier) if key is not None else (ANONYMOUS, None)
        decision = await self.limiter.try_acquire(key_id, tier, cost)
        error = decision.to_error()
        if error is not None:
            raise error

    async def lookup(
        self, req: GenerationRequest, versions: Sequence[str]
    ) -> CachedAnswer | None:
        """A cached answer for ``req`` from any of the model versions that could serve it."""
        if not self.config.cache.enabled or not cacheable(req):
            return None
        for version in versions:
            key = cache_key(req, version)
            if key is not None and (hit := await self.cache.get(key)) is not None:
                return hit
        return None

    async def store(self, req: GenerationRequest, chunks: Sequence[Chunk],
                    served_by: ServedBy) -> None:
        """Remember a whole answer (never an error or a partial one)."""
        if not self.config.cache.enabled or not cacheable(req) or not chunks:
            return
        if chunks[-1].finish_reason is None:
            return
        key = cache_key(req, served_by.model_version)
        if key is None:
            return
        try:
            answer = CachedAnswer.from_chunks(chunks, served_by)
        except ValueError:
            return
        await self.cache.put(key, answer)

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()


async def replay(
    answer: CachedAnswer, req: GenerationRequest, started: float
) -> AsyncIterator[RoutedChunk]:
    """A cached answer as the stream it was, marked cached, with this request's timings."""
    last = len(answer.chunks) - 1
    for i, chunk in enumerate(answer.chunks):
        if i == last:
            elapsed = (time.monotonic() - started) * 1000
            chunk = replace(chunk, timings=Timings(0.0, elapsed, elapsed))
        yield RoutedChunk(chunk, answer.served_by, req.request_id, labelled=i == 0,
                          route_reason="cache: the same request was answered before",
                          cached=True)


def cache_versions(snapshots: Sequence[object], route: str) -> list[str]:
    """Model versions whose cached answers may serve a request on ``route`` (cloud first)."""
    tiers = {"edge": ("edge",), "cloud": ("cloud",)}.get(route, ("cloud", "edge"))
    out: list[str] = []
    for tier in tiers:
        for s in snapshots:
            version = getattr(s, "model_version", "")
            if getattr(s, "tier", None) == tier and version and version not in out:
                out.append(version)
    return out

