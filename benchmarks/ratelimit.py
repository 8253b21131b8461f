"""Rate-limit decisions per second and decision latency against a real local Redis.

Each row runs ``RateLimiter.try_acquire`` in closed loops from N concurrent asyncio clients
(one router process, or several processes sharing the Redis) over a fixed time after a warm-up,
on keys drawn from a fixed-seed pool. The baseline, measured in the same run, is the local
fallback bucket: the same limiter with Redis unreachable and ``on_redis_error="open"``.

    python benchmarks/ratelimit.py                       # starts its own redis-server
    python benchmarks/ratelimit.py --duration 5 --redis-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing as mp
import os
import platform
import random
import statistics
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import redis

from core.launcher import free_port
from core.redis_server import RedisServer
from router.ratelimit import BucketLimit, RateLimitConfig, RateLimiter, redis_client

# Generous limits so most decisions admit (the write path); denials are cheaper (no write).
LIMIT = BucketLimit(1_000_000, 100_000)
COST = 640  # a 512-token prompt + 128 max_tokens


@dataclass
class Row:
    name: str
    processes: int
    clients: int
    decisions: int
    seconds: float
    admitted: int
    latencies_s: list[float]

    @property
    def per_s(self) -> float:
        return self.decisions / self.seconds

    def pct(self, q: float) -> float:
        lat = sorted(self.latencies_s)
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1e6


async def _run_clients(url: str, clients: int, duration_s: float, warmup_s: float, keys: int,
                       seed: int) -> tuple[int, int, float, list[float]]:
    """``clients`` closed loops on one limiter: decisions, admitted, seconds, latencies."""
    client = redis_client(url, timeout_s=1.0)
    limiter = RateLimiter(client, RateLimitConfig(default=LIMIT, retry_redis_after_s=3600))
    rng = random.Random(seed)
    names = [f"key-{i}" for i in range(keys)]
    latencies: list[float] = []
    counts = [0, 0]
    measuring = False

    async def loop(end: float) -> None:
        while (now := time.perf_counter()) < end:
            d = await limiter.try_acquire(rng.choice(names), None, COST)
            if measuring:
                latencies.append(time.perf_counter() - now)
                counts[0] += 1
                counts[1] += d.allowed

    await asyncio.gather(*(loop(time.perf_counter() + warmup_s) for _ in range(clients)))
    measuring = True
    start = time.perf_counter()
    await asyncio.gather(*(loop(start + duration_s) for _ in range(clients)))
    elapsed = time.perf_counter() - start
    await client.aclose()
    return counts[0], counts[1], elapsed, latencies


def _process(url: str, clients: int, duration_s: float, warmup_s: float, keys: int, seed: int,
             out: mp.Queue) -> None:
    logging.disable(logging.ERROR)  # the baseline's "Redis unreachable" is expected
    out.put(asyncio.run(_run_clients(url, clients, duration_s, warmup_s, keys, seed)))


def measure(name: str, url: str, processes: int, clients: int, args: argparse.Namespace) -> Row:
    if processes == 1:
        logging.disable(logging.ERROR)
        n, ok, secs, lat = asyncio.run(
            _run_clients(url, clients, args.duration, args.warmup, args.keys, args.seed))
        return Row(name, 1, clients, n, secs, ok, lat)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_process, args=(url, clients, args.duration, args.warmup,
                                                args.keys, args.seed + i, out))
             for i in range(processes)]
    for p in procs:
        p.start()
    results = [out.get(timeout=args.duration + args.warmup + 60) for _ in procs]
    for p in procs:
        p.join()
    # Processes start within a few ms of each other; aggregate rate = sum of per-process rates.
    per_s = sum(r[0] / r[2] for r in results)
    secs = statistics.mean(r[2] for r in results)
    return Row(name, processes, clients, round(per_s * secs), secs, sum(r[1] for r in results),
               [x for r in results for x in r[3]])


def machine(url: str) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = redis.Redis.from_url(url).info("server")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} cores (load average {load} at start), "
            f"Python {platform.python_version()}, redis-py {redis.__version__}, "
            f"redis-server {info['redis_version']} on loopback")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis-url", help="an existing Redis (default: start one)")
    ap.add_argument("--duration", type=float, default=3.0, help="measured seconds per row")
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--keys", type=int, default=1000, help="API keys drawn from, uniformly")
    ap.add_argument("--clients", default="1,4,16", help="concurrent asyncio clients per row")
    ap.add_argument("--processes", type=int, default=2, help="router processes of the last row")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    server = None if args.redis_url else RedisServer().start()
    url = args.redis_url or server.url  # type: ignore[union-attr]
    dead_url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens: every decision is local
    try:
        info = machine(url)
        clients = [int(c) for c in args.clients.split(",")]
        rows = [measure("local fallback (baseline)", dead_url, 1, c, args)
                for c in (clients[0], clients[-1])]
        rows += [measure("Redis", url, 1, c, args) for c in clients]
        rows.append(measure("Redis", url, args.processes, clients[-1], args))
        stats = redis.Redis.from_url(url).info("commandstats").get("cmdstat_evalsha", {})
    finally:
        if server is not None:
            server.stop()
    print(f"\nMachine: {info}")
    print(f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {args.duration:g} s per row after "
          f"{args.warmup:g} s warm-up, {args.keys} keys, cost {COST} tokens\n")
    print("| bucket | processes x clients | decisions/s | p50 µs | p99 µs | admitted |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r.name} | {r.processes} x {r.clients} | {r.per_s:,.0f} | {r.pct(0.5):,.0f} | "
              f"{r.pct(0.99):,.0f} | {r.admitted / max(1, r.decisions):.0%} |")
    # Time inside Redis per script run: what is left of a decision is client and loop overhead.
    print(f"\nInside Redis: {stats.get('usec_per_call', float('nan')):.1f} µs per script run "
          f"({stats.get('calls', 0):,} runs)")


if __name__ == "__main__":
    main()
