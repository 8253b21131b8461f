"""The distributed token bucket against a real redis-server (one per module, FLUSHDB per test).

Router processes are real processes (multiprocessing, spawn) sharing one Redis; outages are a
SIGKILLed server, and recovery a new one on the same port.
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing as mp
import os
import queue
import random
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
from redis.asyncio import Redis

from core.redis_server import RedisServer
from router.ratelimit import (
    LIMITER_UNAVAILABLE,
    OVER_CAPACITY,
    RATE_LIMITED,
    BucketLimit,
    CostWeights,
    LocalTokenBucket,
    RateLimitConfig,
    RateLimiter,
    redis_client,
    request_cost,
)

# Generous: on a loaded 2-core box a 0.2 s read timeout would look like an outage and let the
# limiter fall back to local buckets, which is not what these tests measure.
TEST_TIMEOUT_S = 5.0


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    c = redis_client(redis_server.url, timeout_s=TEST_TIMEOUT_S)
    await c.flushdb()
    yield c
    await c.aclose()


def test_redis_server_starts_and_stops_fast(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        sync = redis.Redis.from_url(server.url)
        assert sync.ping() and sync.config_get("save") == {"save": ""}
        sync.close()
    assert server.proc is not None and server.proc.returncode == 0  # SIGTERM: a clean exit
    # Stopped by the signal (milliseconds), not a client SHUTDOWN (seconds of redis-py retries),
    # and it exited on it: not the SIGKILL that follows a stop timeout (returncode -9).
    assert "Received SIGTERM" in server.log_tail()


# -- (a) several router processes, one key ---------------------------------------------------


def _hammer(url: str, limit: tuple[float, float], seed: int, window_s: float, tasks: int,
            ready: mp.Queue, go: mp.synchronize.Event, results: mp.Queue) -> None:
    """One router process: ``tasks`` concurrent clients take random costs for ``window_s``."""

    async def run() -> tuple[int, int, list[str]]:
        client = redis_client(url, timeout_s=TEST_TIMEOUT_S)
        limiter = RateLimiter(client, RateLimitConfig(keys={"shared": limit}))
        await limiter.try_acquire("warm-up", None, 0)  # connect and load the script first
        ready.put(os.getpid())
        go.wait()
        end = time.monotonic() + window_s
        rng = random.Random(seed)
        admitted, denied, sources = 0, 0, set()

        async def one_client() -> None:
            nonlocal admitted, denied
            while time.monotonic() < end:
                cost = rng.randint(1, 20)
                decision = await limiter.try_acquire("shared", None, cost)
                sources.add(decision.source)
                if decision.allowed:
                    admitted += cost
                else:
                    denied += 1

        await asyncio.gather(*(one_client() for _ in range(tasks)))
        await client.aclose()
        return admitted, denied, sorted(sources)

    results.put(asyncio.run(run()))


def test_router_processes_never_over_admit(redis_server: RedisServer) -> None:
    capacity, rate, window_s, n_procs = 300.0, 600.0, 1.5, 4
    sync = redis.Redis.from_url(redis_server.url, socket_timeout=TEST_TIMEOUT_S)
    sync.flushdb()
    ctx = mp.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_hammer, daemon=True,
                         args=(redis_server.url, (capacity, rate), i, window_s, 4, ready, go,
                               results))
             for i in range(n_procs)]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            while True:  # fail fast if a worker dies before it is ready
                try:
                    ready.get(timeout=0.2)
                    break
                except queue.Empty:
                    dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                    assert not dead, f"a router process died with {dead}"
        sec, usec = sync.time()
        t0_us = sec * 1_000_000 + usec  # Redis' clock: the window opens before anyone takes
        go.set()
        outs = [results.get(timeout=30) for _ in procs]
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    admitted = sum(o[0] for o in outs)
    assert {s for o in outs for s in o[2]} == {"redis"}, outs  # no process fell back
    assert sum(o[1] for o in outs) > 0  # there was contention: requests were denied
    # The bucket's ts is Redis' time of the last admission: the window closes there.
    state = sync.hgetall("tandem:bucket:shared")
    last_us = int(state[b"ts"])
    bound = capacity + rate * (last_us - t0_us) / 1e6
    assert admitted <= bound + 1e-6, (admitted, bound)
    # Close to the bound: only the final remainder (< one cost) and the ms before the first take.
    assert admitted >= 0.9 * bound, (admitted, bound)
    assert float(state[b"tokens"]) < 20 + 1e-9
    sync.close()


# -- (b) refill, (c) tiers and keys, (d) over capacity, (f) TTL -------------------------------


async def test_idle_key_refills(client: Redis) -> None:
    limiter = RateLimiter(client, RateLimitConfig(keys={"k": (50, 500)}))
    assert (await limiter.try_acquire("k", None, 50)).allowed
    denied = await limiter.try_acquire("k", None, 50)
    assert not denied.allowed and denied.reason == RATE_LIMITED
    assert denied.retry_after_s is not None and 0 < denied.retry_after_s <= 0.1
    await asyncio.sleep(denied.retry_after_s + 0.005)  # the hint is enough, to the millisecond
    assert (await limiter.try_acquire("k", None, 50)).allowed
    deadline = time.monotonic() + 2.0
    while (remaining := (await limiter.try_acquire("k", None, 0)).remaining) < 50:
        assert time.monotonic() < deadline, f"the bucket did not refill: {remaining}"
        await asyncio.sleep(0.01)
    assert remaining == 50  # refills to capacity, never past it


async def test_limits_per_tier_and_per_key(client: Redis) -> None:
    config = RateLimitConfig(default=BucketLimit(1000, 1), tiers={"free": (10, 1), "pro": (100, 1)},
                             keys={"special": (3, 1)})
    limiter = RateLimiter(client, config)
    for key in ("free-1", "free-2"):  # one bucket per key, the tier's size each
        assert (await limiter.try_acquire(key, "free", 10)).allowed
        assert not (await limiter.try_acquire(key, "free", 1)).allowed
    assert (await limiter.try_acquire("pro-1", "pro", 100)).allowed
    assert (await limiter.try_acquire("other", "no-such-tier", 1000)).allowed  # the default
    # A key's own limit wins over its tier's.
    assert (await limiter.try_acquire("special", "pro", 4)).reason == OVER_CAPACITY
    assert (await limiter.try_acquire("special", "pro", 3)).allowed
    assert not (await limiter.try_acquire("special", "pro", 1)).allowed


async def test_cost_over_capacity_is_invalid_and_touches_nothing(client: Redis) -> None:
    limiter = RateLimiter(client, RateLimitConfig(tiers={"free": (100, 10)}))
    d = await limiter.try_acquire("k", "free", request_cost(90, 11))
    assert not d.allowed and d.reason == OVER_CAPACITY and d.retry_after_s is None
    error = d.to_error()
    assert error is not None and error.status == "INVALID_ARGUMENT" and "101" in error.message
    assert await client.exists(limiter.bucket_key("k")) == 0
    assert request_cost(90, 11, CostWeights(prompt=0.5, max_tokens=2.0)) == 67
    # An ordinary denial is RESOURCE_EXHAUSTED with the wait as its hint.
    assert (await limiter.try_acquire("k", "free", 100)).allowed
    limited = (await limiter.try_acquire("k", "free", 50)).to_error()
    assert limited is not None and limited.status == "RESOURCE_EXHAUSTED"
    assert limited.retry_after_s is not None and 4.0 < limited.retry_after_s <= 5.0


async def test_bucket_keys_expire_once_full_again(client: Redis) -> None:
    config = RateLimitConfig(tiers={"t": (100, 10)}, ttl_margin_s=5)
    limiter = RateLimiter(client, config)
    assert (await limiter.try_acquire("k", "t", 30)).allowed
    assert not (await limiter.try_acquire("k", "t", 90)).allowed
    ttl_ms = await client.pttl(limiter.bucket_key("k"))
    assert 10_000 < ttl_ms <= 15_000  # full refill (100 / 10 s) + the 5 s margin
    assert [k async for k in client.scan_iter("tandem:bucket:*")] == [b"tandem:bucket:k"]


def test_local_bucket_semantics_and_pruning() -> None:
    now = [0.0]
    bucket = LocalTokenBucket(clock=lambda: now[0])
    limit = BucketLimit(10, 2)
    assert bucket.try_acquire("k", limit, 10).allowed
    d = bucket.try_acquire("k", limit, 1)
    assert not d.allowed and d.retry_after_s == pytest.approx(0.5) and d.source == "local"
    now[0] = 0.5
    assert bucket.try_acquire("k", limit, 1).allowed
    now[0] = 100.0
    assert bucket.try_acquire("k", limit, 0).remaining == 10  # capped at capacity
    bucket.prune()
    assert len(bucket) == 0  # a full bucket is forgotten: it reads as full anyway


# -- (e) Redis dies and comes back -------------------------------------------------------------


def _records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "router.ratelimit" and r.levelno == level]


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_redis_outage_and_recovery(
    mode: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="router.ratelimit")
    config = RateLimitConfig(keys={"k": (10, 0.01)}, on_redis_error=mode,  # type: ignore[arg-type]
                             retry_redis_after_s=0.05)
    server = RedisServer(tmp_path / "first").start()
    client = redis_client(server.url, timeout_s=TEST_TIMEOUT_S)
    limiter = RateLimiter(client, config)
    try:
        assert (await limiter.try_acquire("k", None, 4)).source == "redis"
        server.kill()
        decisions = [await limiter.try_acquire("k", None, 4) for _ in range(3)]
        await asyncio.sleep(0.06)  # past the retry interval: the next call probes (and fails)
        decisions.append(await limiter.try_acquire("k", None, 1))
        assert not limiter.redis_ok
        if mode == "open":
            # The local bucket starts full and keeps the same semantics: 10 -> 6 -> 2 -> no.
            assert [d.source for d in decisions] == ["local"] * 4
            assert [d.allowed for d in decisions] == [True, True, False, True]
            assert decisions[2].reason == RATE_LIMITED and decisions[2].retry_after_s
        else:
            assert not any(d.allowed for d in decisions)
            assert {d.reason for d in decisions} == {LIMITER_UNAVAILABLE}
            error = decisions[0].to_error()
            assert error is not None and error.status == "UNAVAILABLE"
            assert error.retry_after_s == pytest.approx(0.05)
        assert len(_records(caplog, logging.ERROR)) == 1  # once per outage, not per request

        server = RedisServer(tmp_path / "second", port=server.port).start()
        deadline = time.monotonic() + 3.0
        while (d := await limiter.try_acquire("k", None, 4)).source != "redis":
            assert time.monotonic() < deadline, "the limiter did not go back to Redis"
            await asyncio.sleep(0.02)
        assert d.allowed and limiter.redis_ok  # the new Redis starts with a full bucket
        assert any("back" in r.getMessage() for r in _records(caplog, logging.INFO))
        assert len(_records(caplog, logging.ERROR)) == 1
    finally:
        await client.aclose()
        server.stop()


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="refill_per_s"):
        RateLimitConfig(tiers={"free": (10, 0)})
    with pytest.raises(ValueError, match="on_redis_error"):
        RateLimitConfig(on_redis_error="maybe")  # type: ignore[arg-type]
    assert RateLimitConfig().limit_for("any", None) == RateLimitConfig().default
    assert math.isclose(RateLimitConfig(tiers={"x": (5, 1)}).limit_for("k", "x").capacity, 5)
