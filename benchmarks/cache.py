"""Response cache: end-to-end latency of a hit vs a miss, and the hit rate over the Azure trace.

Part 1 (latency). A real cloud tier (`tandem cloud serve`, a child process), a real redis-server
and, in this process, the real router (``router.server.start_router``: API keys on, rate limits
off, the response cache in its request flow: auth -> validate -> cache lookup -> route -> relay
-> store). A gRPC client in this process streams greedy requests one at a time:
  miss         distinct prompts: routed to the cloud tier, answer stored;
  hit (Redis)  the same prompts with the router's in-process LRU emptied first;
  hit (LRU)    the same prompts again;
  cloud direct the cloud tier without the router, for scale.

Part 2 (hit rate). The Azure code trace has arrival times and token counts but no prompt text,
so repeated prompts are modelled: each request draws a prompt from a fixed pool with Zipf
popularity (rank r has weight r^-s), every request greedy with that prompt's fixed parameters.
Arrivals are replayed in order against two ResponseCache instances (two routers, alternating)
over one real Redis, with time compressed ``--speedup`` times and every TTL divided by the same
factor, so entries expire as they would over the trace's real hour.

    python benchmarks/cache.py                      # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime
import os
import platform
import random
import tempfile
import time
from bisect import bisect
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import grpc
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from core.engine_api import Chunk, ServedBy, Usage
from core.grpc_server import (
    ServerConfig,
)
from core.launcher import ManagedProcess, free_port, stop_all, tandem_argv
from core.redis_server import RedisServer
from core.request import GenerationRequest
from protos.tandem.v1 import inference_pb2 as pb
from protos.tandem.v1 import inference_pb2_grpc as pb_grpc
from router.cache import CacheConfig, CachedAnswer, ResponseCache, cache_key
from router.config import RouterConfig
from router.frontdoor import FrontDoorConfig
from router.keys import AuthConfig, KeyStore
from router.server import start_router

ROOT = Path(__file__).resolve().parents[1]
TRACE = Path(os.environ.get("TANDEM_TRACE_DIR", ROOT.parent / "shared" / "data" / "traces"
                            / "azure_llm_2023")) / "AzureLLMInferenceTrace_code.csv"


@dataclass
class Timing:
    ttft_ms: float
    e2e_ms: float
    cached: bool
    chunks: int


async def stream_once(stub: pb_grpc.InferenceStub, prompt: str, max_tokens: int,
                      metadata: tuple[tuple[str, str], ...]) -> Timing:
    req = pb.GenerateRequest(prompt=prompt, max_tokens=max_tokens, temperature=0.0)
    start = time.perf_counter()
    ttft = None
    cached, n = False, 0
    async for chunk in stub.GenerateStream(req, metadata=metadata, timeout=60):
        if ttft is None:
            ttft = time.perf_counter() - start
        cached, n = chunk.cached, n + 1
    return Timing((ttft or 0) * 1e3, (time.perf_counter() - start) * 1e3, cached, n)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def prompts(n: int) -> list[str]:
    """Distinct prompts: the first words of held-out corpus documents."""
    from model.corpus import load_corpus

    texts = load_corpus().texts(split="heldout")
    out = list(dict.fromkeys(" ".join(t.split()[:12]) for t in texts))
    assert len(out) >= n, f"only {len(out)} distinct prompts"
    return out[:n]


async def latency_part(args: argparse.Namespace, redis_url: str, home: Path) -> list[str]:
    port = free_port()
    cloud = ManagedProcess(
        "cloud", tandem_argv("cloud", "serve", "--port", str(port), "--device", args.device,
                             "--slots", "4"),
        home / "cloud.log", address=f"127.0.0.1:{port}").start()
    redis = aioredis.Redis.from_url(redis_url, retry=Retry(NoBackoff(), 0))
    try:
        cloud.wait_healthy(300)
        front = FrontDoorConfig(redis_url=redis_url, auth=AuthConfig(enabled=True),
                                rate_limit=None, cache=CacheConfig())
        config = RouterConfig(backends=[cloud.address or ""], server=ServerConfig(port=0),
                              front_door=front)
        _, token = await KeyStore(redis).create("bench")
        router = await start_router(config)
        cache = router.servicer.front.cache
        rport = router.port
        md = (("x-api-key", token),)
        rows: dict[str, list[Timing]] = {}
        async with grpc.aio.insecure_channel(f"127.0.0.1:{rport}") as ch, \
                grpc.aio.insecure_channel(cloud.address or "") as direct:
            stub, cloud_stub = pb_grpc.InferenceStub(ch), pb_grpc.InferenceStub(direct)
            warm = prompts(args.misses + 5)
            for p in warm[-5:]:  # warm-up: connections, kernels, the key cache (not measured)
                await stream_once(stub, p, args.max_tokens, md)
                await stream_once(cloud_stub, p, args.max_tokens, ())
            pool_prompts = warm[: args.misses]
            rows["cloud tier direct (no router, no cache)"] = [
                await stream_once(cloud_stub, p, args.max_tokens, ()) for p in pool_prompts]
            rows["miss: router -> cloud, answer stored"] = [
                await stream_once(stub, p, args.max_tokens, md) for p in pool_prompts]
            redis_hits = []
            for _ in range(args.hit_rounds):
                for p in pool_prompts:
                    cache.clear_local()
                    redis_hits.append(await stream_once(stub, p, args.max_tokens, md))
            rows["hit from Redis (router LRU emptied)"] = redis_hits
            rows["hit from the router's LRU"] = [
                await stream_once(stub, p, args.max_tokens, md)
                for _ in range(args.hit_rounds) for p in pool_prompts]
        await router.stop(1)
    finally:
        await redis.aclose()
        stop_all([cloud])
    assert all(not t.cached for t in rows["miss: router -> cloud, answer stored"])
    assert all(t.cached for k, v in rows.items() if k.startswith("hit") for t in v)
    lines = ["| path | requests | TTFT p50 / p99 ms | end-to-end p50 / p99 ms | chunks/answer |",
             "| --- | --- | --- | --- | --- |"]
    for name, ts in rows.items():
        ttft, e2e = [t.ttft_ms for t in ts], [t.e2e_ms for t in ts]
        lines.append(f"| {name} | {len(ts)} | {pct(ttft, .5):.2f} / {pct(ttft, .99):.2f} | "
                     f"{pct(e2e, .5):.2f} / {pct(e2e, .99):.2f} | "
                     f"{sum(t.chunks for t in ts) / len(ts):.1f} |")
    return lines


def load_trace() -> list[tuple[float, int]]:
    """(seconds since the first request, generated tokens) of every request."""
    rows = list(csv.DictReader(TRACE.open()))
    stamps = [datetime.datetime.fromisoformat(r["TIMESTAMP"][:26]) for r in rows]
    return [((t - stamps[0]).total_seconds(), int(r["GeneratedTokens"]))
            for t, r in zip(stamps, rows, strict=True)]


def fake_answer(tokens: int, version: str) -> CachedAnswer:
    """An answer of ``tokens`` tokens in 4-token chunks (entry size like a real one)."""
    tokens = max(1, tokens)
    chunks = [Chunk(" word" * min(4, tokens - i), tuple(range(i, min(i + 4, tokens))))
              for i in range(0, tokens, 4)]
    chunks[-1] = Chunk(chunks[-1].text, chunks[-1].token_ids, "length", Usage(100, tokens))
    return CachedAnswer.from_chunks(chunks, ServedBy("cloud", "cloud-0", version))


async def hit_rate_part(args: argparse.Namespace, redis_url: str) -> list[str]:
    trace = load_trace()
    span = trace[-1][0]
    base = CacheConfig()
    scaled = CacheConfig(
        ttl_tiers=tuple((h, t / args.speedup) for h, t in base.ttl_tiers),
        max_ttl_s=base.max_ttl_s / args.speedup, local_ttl_s=base.local_ttl_s / args.speedup,
        local_entries=args.local_entries)
    lines = ["| Zipf s | requests | distinct prompts used | hit rate | from LRU / from Redis "
             "| unbounded-cache bound |", "| --- | --- | --- | --- | --- | --- |"]
    for s in [float(x) for x in args.zipf.split(",")]:
        rng = random.Random(0)
        cum = list(accumulate((r + 1) ** -s for r in range(args.pool)))
        params = [rng.choice(trace)[1] for _ in range(args.pool)]  # each prompt's answer length
        draws = [bisect(cum, rng.random() * cum[-1]) for _ in trace]
        redis = aioredis.Redis.from_url(redis_url, retry=Retry(NoBackoff(), 0))
        await redis.flushdb()
        routers = [ResponseCache(redis, scaled) for _ in range(2)]
        seen: set[int] = set()
        hits = bound = 0
        start = time.monotonic()
        for i, ((offset, _), p) in enumerate(zip(trace, draws, strict=True)):
            delay = start + offset / args.speedup - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            bound += p in seen
            seen.add(p)
            cache = routers[i % 2]
            req = GenerationRequest(prompt=f"pool prompt {p}", max_tokens=params[p],
                                    temperature=0.0)
            req_key = cache_key(req, "bench-v1")
            assert req_key is not None
            if await cache.get(req_key) is not None:
                hits += 1
            else:
                await cache.put(req_key, fake_answer(params[p], "bench-v1"))
        late = time.monotonic() - start - span / args.speedup
        await redis.aclose()
        local = sum(c.stats.local_hits for c in routers)
        shared = sum(c.stats.redis_hits for c in routers)
        n = len(trace)
        lines.append(f"| {s:g} | {n} | {len(seen)} | {hits / n:.1%} | {local / n:.1%} / "
                     f"{shared / n:.1%} | {bound / n:.1%} |")
        if late > 1.0:
            print(f"warning: the s={s:g} replay ran {late:.1f} s behind the compressed trace")
    return lines


async def main_async(args: argparse.Namespace) -> None:
    home = Path(tempfile.mkdtemp(prefix="tandem-cache-bench-"))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())  # the box is shared: say how busy
    with RedisServer(home / "redis") as server:
        latency = await latency_part(args, server.url, home)
        rate = await hit_rate_part(args, server.url)
    cpu = platform.processor() or platform.machine()
    print(f"\nmachine: {cpu}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"cloud on {args.device}; load average at start {load}; "
          f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(f"\nlatency: greedy streams of max_tokens={args.max_tokens}, {args.misses} prompts, "
          "one request at a time, API key checked on every router request\n")
    print("\n".join(latency))
    print(f"\nhit rate: Azure code trace ({TRACE.name}), pool of {args.pool} prompts, "
          f"2 routers, time x{args.speedup:g}, LRU {args.local_entries} entries per router\n")
    print("\n".join(rate))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--misses", type=int, default=100, help="distinct prompts (misses)")
    parser.add_argument("--hit-rounds", type=int, default=3, help="hits per prompt and level")
    parser.add_argument("--pool", type=int, default=5000, help="prompt pool of the trace replay")
    parser.add_argument("--zipf", default="0.8,1.0,1.2", help="Zipf exponents to replay")
    parser.add_argument("--speedup", type=float, default=120.0, help="trace time compression")
    parser.add_argument("--local-entries", type=int, default=1024)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
