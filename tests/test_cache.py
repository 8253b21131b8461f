"""The two-level response cache against a real redis-server (an empty database per test).

Keys: what makes two requests the same answer. Store: hits from both levels with the stream's
chunk boundaries kept, the LRU bounds, TTLs that grow with hits (read back from Redis), and a
Redis that hangs, then dies, mid-run (bypass, never an error, one log line).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import redis.asyncio as aioredis

from core.engine_api import Chunk, ServedBy, Timings, Usage
from core.redis_server import RedisServer
from core.request import GenerationRequest
from router.cache import CacheConfig, CachedAnswer, ResponseCache, cache_key, cacheable

pytestmark = pytest.mark.timeout(30)

V1, V2 = "demo-cloud-v1", "demo-cloud-v2"
GREEDY = GenerationRequest(prompt="Return a new list", max_tokens=16, temperature=0.0)
SEEDED = GenerationRequest(prompt="Return a new list", max_tokens=16, temperature=0.8, seed=7)
TIERS = ((0, 60.0), (2, 600.0), (5, 3600.0))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def answer(text: str = "a new list", version: str = V1) -> CachedAnswer:
    """A finished three-chunk stream, as the relay would have collected it."""
    words = text.split()
    chunks = [Chunk(f" {w}", (10 + i, 20 + i), None) for i, w in enumerate(words[:-1])]
    chunks.append(Chunk(f" {words[-1]}", (99,), "length", Usage(5, 2 * len(words) - 1),
                        Timings(1.0, 2.0, 3.0)))
    return CachedAnswer.from_chunks(chunks, ServedBy("cloud", "cloud-0", version))


@pytest.fixture(scope="module")
def redis_server() -> RedisServer:
    with RedisServer() as server:
        yield server


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose()


def test_what_makes_a_different_key() -> None:
    base = cache_key(GREEDY, V1)
    assert base is not None and base.startswith(f"tandem:cache:{V1}:")
    changed = [
        replace(GREEDY, prompt="Return a new list "),  # whitespace changes the tokens
        replace(GREEDY, prompt="return a new list"),
        replace(GREEDY, max_tokens=17),
        replace(GREEDY, temperature=0.5, seed=1),
        replace(GREEDY, stop=("\n",)),
    ]
    keys = {cache_key(r, V1) for r in changed}
    assert base not in keys and len(keys) == len(changed)
    assert cache_key(GREEDY, V2) != base and cache_key(GREEDY, V2).startswith(  # type: ignore
        f"tandem:cache:{V2}:")
    # Greedy decoding ignores seed, top_k and top_p; the route and request id never matter.
    same = [replace(GREEDY, seed=3, top_k=5, top_p=0.5), replace(GREEDY, route="edge",
                                                                request_id="other")]
    assert {cache_key(r, V1) for r in same} == {base}
    seeded = cache_key(SEEDED, V1)
    others = {cache_key(replace(SEEDED, **kw), V1) for kw in (
        {"seed": 8}, {"top_k": 5}, {"top_p": 0.9}, {"temperature": 0.9},
        {"stop": ("a", "b")})}
    assert seeded not in others and len(others) == 5
    assert cache_key(replace(SEEDED, stop=("a", "b")), V1) != cache_key(
        replace(SEEDED, stop=("b", "a")), V1)


def test_only_reproducible_requests_the_client_allows() -> None:
    sampled = GenerationRequest(prompt="hi", max_tokens=4, temperature=0.7)
    assert not cacheable(sampled) and cache_key(sampled, V1) is None
    assert cache_key(replace(GREEDY, no_cache=True), V1) is None
    assert cache_key(replace(SEEDED, no_cache=True), V1) is None
    assert cacheable(GREEDY) and cacheable(SEEDED)


async def test_hit_after_put_replays_the_stream(redis: aioredis.Redis) -> None:
    cache = ResponseCache(redis)
    key = cache_key(GREEDY, V1)
    assert key is not None
    assert await cache.get(key) is None
    original = answer("a new sorted list")
    assert await cache.put(key, original) is True
    local = await cache.get(key)
    # Another router: the same answer from Redis, chunk for chunk.
    shared = await ResponseCache(redis).get(key)
    for got in (local, shared):
        assert got is not None
        assert got.chunks == original.chunks and len(got.chunks) == 4
        assert got.text == " a new sorted list" and got.token_ids == (10, 20, 11, 21, 12, 22, 99)
        assert got.finish_reason == "length" and got.usage == Usage(5, 7)
        assert got.served_by == ServedBy("cloud", "cloud-0", V1)
        assert all(c.timings is None for c in got.chunks)  # the replay sets its own
    assert cache.stats.local_hits == 1 and cache.stats.misses == 1


async def test_a_decoding_client_works_too(redis_server: RedisServer,
                                          redis: aioredis.Redis) -> None:
    text = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        key = cache_key(GREEDY, V1)
        assert key is not None
        await ResponseCache(text).put(key, answer())
        got = await ResponseCache(text).get(key)
        assert got is not None and got.chunks == answer().chunks
    finally:
        await text.aclose()


async def test_different_params_and_versions_miss(redis: aioredis.Redis) -> None:
    cache = ResponseCache(redis)
    await cache.put(cache_key(GREEDY, V1), answer())  # type: ignore[arg-type]
    for req, version in ((replace(GREEDY, max_tokens=8), V1), (SEEDED, V1), (GREEDY, V2)):
        key = cache_key(req, version)
        assert key is not None
        assert await cache.get(key) is None
        assert await ResponseCache(redis).get(key) is None


async def test_partial_or_oversized_answers_are_not_cached(redis: aioredis.Redis) -> None:
    with pytest.raises(ValueError, match="finished"):
        CachedAnswer.from_chunks([Chunk(" a", (1,))], ServedBy("cloud", "c", V1))
    with pytest.raises(ValueError, match="finished"):
        CachedAnswer.from_chunks([], ServedBy("cloud", "c", V1))
    cache = ResponseCache(redis, CacheConfig(max_entry_bytes=200))
    key = cache_key(GREEDY, V1)
    assert key is not None
    partial = CachedAnswer((Chunk(" a", (1,)),), ServedBy("cloud", "c", V1))
    assert await cache.put(key, partial) is False
    assert await cache.put(key, answer(" ".join(["word"] * 40))) is False
    assert await cache.get(key) is None and await redis.dbsize() == 0


async def test_local_lru_is_bounded(redis: aioredis.Redis) -> None:
    cache = ResponseCache(redis, CacheConfig(local_entries=3))
    keys = [cache_key(replace(GREEDY, prompt=f"prompt {i}"), V1) for i in range(5)]
    for key in keys:
        await cache.put(key, answer())  # type: ignore[arg-type]
    assert len(cache._local) == 3
    for key in keys[2:]:
        assert await cache.get(key) is not None  # type: ignore[arg-type]
    assert (cache.stats.local_hits, cache.stats.redis_hits) == (3, 0)
    assert await cache.get(keys[0]) is not None  # type: ignore[arg-type]
    assert cache.stats.redis_hits == 1 and len(cache._local) == 3

    one = answer()
    size = len(one.to_json())
    by_bytes = ResponseCache(redis, CacheConfig(local_bytes=2 * size))
    for key in keys:
        await by_bytes.put(key, one)  # type: ignore[arg-type]
    assert len(by_bytes._local) == 2 and by_bytes._local_bytes == 2 * size


async def test_ttl_grows_with_hits(redis: aioredis.Redis) -> None:
    cache = ResponseCache(redis, CacheConfig(ttl_tiers=TIERS, local_entries=0))
    key = cache_key(GREEDY, V1)
    assert key is not None
    await cache.put(key, answer())
    ttls = [await redis.pttl(key)]
    for _ in range(5):
        assert await cache.get(key) is not None
        ttls.append(await redis.pttl(key))
    seconds = [round(t / 1000, -1) for t in ttls]
    assert seconds == [60, 60, 600, 600, 600, 3600]
    assert int(await redis.hget(key, "hits")) == 5
    capped = ResponseCache(redis, CacheConfig(ttl_tiers=TIERS, max_ttl_s=100, local_entries=0))
    await capped.get(key)
    assert 90_000 < await redis.pttl(key) <= 100_000


async def test_local_hits_reach_the_shared_count(redis: aioredis.Redis) -> None:
    clock = Clock()
    cache = ResponseCache(redis, CacheConfig(ttl_tiers=TIERS, local_ttl_s=30.0), clock=clock)
    key = cache_key(GREEDY, V1)
    assert key is not None
    await cache.put(key, answer())
    for _ in range(4):
        await cache.get(key)
    assert cache.stats.local_hits == 4 and int(await redis.hget(key, "hits")) == 0
    clock.now += 31.0  # the local copy expires: the next read goes to Redis with its hits
    assert await cache.get(key) is not None
    assert int(await redis.hget(key, "hits")) == 5
    assert round(await redis.pttl(key) / 1000, -1) == 3600


async def test_redis_outage_is_a_bypass(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="router.cache")
    clock = Clock()
    with RedisServer() as server:
        # A client that never gives up on a reply (redis-py's default does after 5 s): only the
        # cache's own timeout can end a call to a hung Redis.
        client = aioredis.Redis.from_url(server.url, socket_timeout=None)
        cache = ResponseCache(client, CacheConfig(retry_redis_after_s=1.0), clock=clock)
        k1, k2, k3 = (cache_key(replace(GREEDY, prompt=p), V1) for p in ("one", "two", "three"))
        assert await cache.put(k1, answer()) is True  # type: ignore[arg-type]
        # Hung first (SIGSTOP: the connection stays open, no reply ever comes; a cache that
        # waited on it would hang until pytest's timeout), then dead (connection refused).
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)
        assert await cache.get(k1) is not None  # type: ignore[arg-type]  # the local level
        for round_ in range(3):
            assert await cache.get(k2) is None  # type: ignore[arg-type]
            assert await cache.put(k3, answer()) is False  # type: ignore[arg-type]
            clock.now += 2.0  # past the back-off: each round tries Redis again
            if round_ == 0:
                server.kill()
        assert cache.stats.bypasses == 6
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "bypassing" in errors[0].getMessage()

        # Back on the same port: the cache uses it again and says so once.
        with RedisServer(port=server.port):
            clock.now += 2.0
            assert await cache.put(k2, answer()) is True  # type: ignore[arg-type]
            assert await ResponseCache(client).get(k2) is not None  # type: ignore[arg-type]
        assert any("reachable again" in r.getMessage() for r in caplog.records)
        await client.aclose()


async def test_disabled_cache_does_nothing(redis: aioredis.Redis) -> None:
    cache = ResponseCache(redis, CacheConfig(enabled=False))
    key = cache_key(GREEDY, V1)
    assert key is not None
    assert await cache.put(key, answer()) is False
    assert await cache.get(key) is None and await redis.dbsize() == 0


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="start at 0"):
        CacheConfig(ttl_tiers=((1, 60.0),))
    with pytest.raises(ValueError, match="ascend"):
        CacheConfig(ttl_tiers=((0, 60.0), (5, 600.0), (2, 900.0)))
    assert CacheConfig(ttl_tiers=TIERS, max_ttl_s=1000).ttl_s(7) == 1000
    assert CacheConfig(ttl_tiers=TIERS).ttl_s(4) == 600
