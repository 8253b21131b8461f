"""The router's front door with a real Redis and a real cloud tier: keys, limits, cache."""

from __future__ import annotations

import grpc
import pytest

from cloud.engine import CloudEngineConfig
from cloud.server import CloudServerConfig, start_cloud_server
from core.grpc_server import RETRY_AFTER_KEY, ServerConfig
from core.redis_server import RedisServer
from model.demo import DEMO_DIR
from protos.tandem.v1 import inference_pb2 as pb
from protos.tandem.v1 import inference_pb2_grpc
from router.frontdoor import FrontDoorConfig
from router.keys import AuthConfig, KeyStore
from router.ratelimit import BucketLimit, RateLimitConfig, redis_client
from router.server import RouterConfig, start_router

PROMPT = "Return a new list containing all items"


@pytest.fixture
async def stack(tmp_path):
    with RedisServer(tmp_path / "redis") as redis:
        cloud = await start_cloud_server(CloudServerConfig(
            engine=CloudEngineConfig(checkpoint=DEMO_DIR / "cloud"),
            server=ServerConfig(port=0, grace_s=1.0),
        ))
        calls = {"n": 0}
        generate = cloud.engine.generate

        def counting(req):  # how many requests reach the backend
            calls["n"] += 1
            return generate(req)

        cloud.engine.generate = counting  # type: ignore[method-assign]
        client = redis_client(redis.url, timeout_s=2.0)
        store = KeyStore(client)
        keys = {
            "tiny": (await store.create("tiny", tier="tiny"))[1],
            "edge-only": (await store.create("edge-only", routes=("edge",)))[1],
            "big": (await store.create("big", tier="big"))[1],
        }
        await client.aclose()
        router = await start_router(RouterConfig(
            backends=[cloud.address], server=ServerConfig(port=0, grace_s=1.0),
            front_door=FrontDoorConfig(
                redis_url=redis.url, auth=AuthConfig(enabled=True),
                rate_limit=RateLimitConfig(tiers={"tiny": BucketLimit(200, 1.0),
                                                  "big": BucketLimit(100_000, 10_000.0)}),
                tokenizer_dir=DEMO_DIR / "edge", redis_timeout_s=0.5,
            ),
        ))
        channel = grpc.aio.insecure_channel(router.address)
        try:
            yield (inference_pb2_grpc.InferenceStub(channel), keys, calls, redis, router, cloud)
        finally:
            await channel.close()
            await router.stop(1.0)
            await cloud.stop(1.0)


def _md(key: str | None) -> tuple[tuple[str, str], ...]:
    return (("x-api-key", key),) if key else ()


def _req(**kw: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(**({"prompt": PROMPT, "max_tokens": 16, "temperature": 0.0} | kw))


async def test_keys_gate_every_call(stack) -> None:
    stub, keys, *_ = stack
    for md in ((), _md("tdm_0000000000000000_nope")):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Generate(_req(), metadata=md, timeout=20)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Generate(_req(route=pb.ROUTE_CLOUD), metadata=_md(keys["edge-only"]),
                            timeout=20)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    ok = await stub.Generate(_req(), metadata=_md(keys["big"]), timeout=20)
    assert ok.text and not ok.cached
    # Refused calls never reach the servicer; the interceptor still counts them.
    router = stack[4]
    counted = {
        status: router.metrics.registry.get_sample_value(
            "tandem_router_requests_total",
            {"method": "Generate", "route": "none", "tier": "none", "status": status})
        for status in ("UNAUTHENTICATED", "PERMISSION_DENIED")
    }
    assert counted == {"UNAUTHENTICATED": 2.0, "PERMISSION_DENIED": 1.0}, counted


async def test_cache_hit_costs_no_backend_work_and_replays_the_stream(stack) -> None:
    stub, keys, calls, *_ = stack
    md = _md(keys["big"])
    first = await stub.Generate(_req(), metadata=md, timeout=20)
    seen = calls["n"]
    again = await stub.Generate(_req(), metadata=md, timeout=20)
    assert again.cached and again.text == first.text and calls["n"] == seen
    assert again.served_by == first.served_by  # who originally answered
    streamed = [c async for c in stub.GenerateStream(_req(max_tokens=24), metadata=md,
                                                     timeout=20)]
    replayed = [c async for c in stub.GenerateStream(_req(max_tokens=24), metadata=md,
                                                     timeout=20)]
    assert all(c.cached for c in replayed) and not any(c.cached for c in streamed)
    assert [c.text for c in replayed] == [c.text for c in streamed]  # same chunks
    # Sampled without a seed is not reproducible: never cached.
    n = calls["n"]
    for _ in range(2):
        r = await stub.Generate(_req(temperature=0.8), metadata=md, timeout=20)
        assert not r.cached
    assert calls["n"] == n + 2


async def test_rate_limit_denies_with_a_retry_hint(stack) -> None:
    stub, keys, *_ = stack
    md = _md(keys["tiny"])
    await stub.Generate(_req(max_tokens=150, no_cache=True), metadata=md, timeout=20)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Generate(_req(max_tokens=150, no_cache=True), metadata=md, timeout=20)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert int(dict(e.value.trailing_metadata())[RETRY_AFTER_KEY]) > 1000
    with pytest.raises(grpc.aio.AioRpcError) as e:  # can never fit the bucket
        await stub.Generate(_req(max_tokens=400, no_cache=True), metadata=md, timeout=20)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_redis_down_keeps_serving(stack) -> None:
    stub, keys, _, redis, *_ = stack
    md = _md(keys["big"])
    await stub.Generate(_req(), metadata=md, timeout=20)  # the key is now verified here
    redis.kill()
    for i in range(3):  # fail-open limiter, cache bypass, recently verified key still valid
        r = await stub.Generate(_req(prompt=f"{PROMPT} {i}"), metadata=md, timeout=20)
        assert r.text
