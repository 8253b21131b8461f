"""API keys against a real redis-server, and the key interceptor on a real grpc.aio server.

Keys: hashed at rest, create/list/revoke, every verify refusal, the verified-key cache and a Redis
outage. Interceptor: an ``EngineServicer`` over a tiny in-test engine behind ``ApiKeyInterceptor``
on port 0; each refusal is checked by its status code, and the servicer sees the caller's key.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from core.engine_api import Chunk, EngineInfo, EngineLoad, ScoreResult, ServedBy, Usage
from core.engine_servicer import EngineServicer
from core.errors import Unauthenticated, Unavailable
from core.grpc_server import (
    INFERENCE_SERVICE,
    ServerConfig,
    add_inference_servicer,
    build_server,
    set_serving,
)
from core.redis_server import RedisServer
from core.request import GenerationRequest, Limits
from protos.tandem.v1 import inference_pb2 as pb
from protos.tandem.v1 import inference_pb2_grpc as pb_grpc
from router.auth import ApiKeyInterceptor, auth_interceptors
from router.keys import INDEX_KEY, KEY_TEMPLATE, AuthConfig, KeyStore, current_key

pytestmark = pytest.mark.timeout(30)


class Clock:
    """A hand-moved monotonic clock for the verified-key cache."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def redis_server() -> RedisServer:
    with RedisServer() as server:
        yield server


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushdb()  # each test starts on an empty database
    try:
        yield client
    finally:
        await client.aclose()


async def test_keys_are_hashed_at_rest(redis: aioredis.Redis) -> None:
    store = KeyStore(redis)
    key_id, token = await store.create("alice", "gold", ["auto", "edge"])
    secret = token.split("_", 2)[2]
    assert token.startswith(f"tdm_{key_id}_") and len(secret) >= 40
    dump = b""
    async for name in redis.scan_iter():
        kind = await redis.type(name)
        value = await (redis.hgetall(name) if kind == b"hash" else redis.smembers(name))
        dump += name + repr(value).encode()
    assert secret.encode() not in dump and token.encode() not in dump
    fields = await redis.hgetall(KEY_TEMPLATE.format(key_id=key_id))
    assert fields[b"hash"] == b"sha256:" + hashlib.sha256(secret.encode()).hexdigest().encode()
    assert await redis.smembers(INDEX_KEY) == {key_id.encode()}


async def test_pepper_makes_an_hmac(redis: aioredis.Redis) -> None:
    peppered = KeyStore(redis, AuthConfig(pepper=b"server pepper"))
    key_id, token = await peppered.create("bob")
    secret = token.split("_", 2)[2]
    expected = hmac.new(b"server pepper", secret.encode(), hashlib.sha256).hexdigest()
    stored = await redis.hget(KEY_TEMPLATE.format(key_id=key_id), "hash")
    assert stored == f"hmac-sha256:{expected}".encode()
    assert (await peppered.verify(token)).key_id == key_id
    with pytest.raises(Unauthenticated, match="not recognized"):
        await KeyStore(redis).verify(token)  # a router without the pepper can't verify it


async def test_create_list_revoke(redis: aioredis.Redis) -> None:
    store = KeyStore(redis)
    before = time.time()
    a, token_a = await store.create("alice", "gold", ["edge", "auto", "edge"])
    b, _ = await store.create("bob")
    records = await store.list()
    assert [r.key_id for r in records] == [a, b]
    alice = records[0]
    assert (alice.name, alice.tier, alice.routes, alice.revoked) == (
        "alice", "gold", ("auto", "edge"), False)
    assert before <= alice.created_at <= time.time()
    assert not any(token_a.split("_", 2)[2] in repr(r) for r in records)
    assert (await store.verify(token_a)).tier == "gold"

    assert await store.revoke(a) is True
    assert await store.revoke("0123456789abcdef") is False
    assert [r.revoked for r in await store.list()] == [True, False]
    with pytest.raises(Unauthenticated, match="was revoked"):
        await store.verify(token_a)


async def test_a_decoding_client_works_too(redis_server: RedisServer,
                                          redis: aioredis.Redis) -> None:
    text = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        store = KeyStore(text)
        key_id, token = await store.create("alice", "gold", ["edge"])
        assert (await store.verify(token)).routes == ("edge",)
        assert [r.key_id for r in await store.list()] == [key_id]
    finally:
        await text.aclose()


@pytest.mark.parametrize(("fields", "message"), [
    ({"name": ""}, "key name"),
    ({"tier": "gold tier"}, "key tier"),
    ({"routes": []}, "routes must be"),
    ({"routes": ["auto", "moon"]}, "routes must be"),
])
async def test_create_checks_its_fields(redis: aioredis.Redis, fields: dict, message: str
                                        ) -> None:
    args = {"name": "x", "tier": "default", "routes": ["auto"]} | fields
    with pytest.raises(ValueError, match=message):
        await KeyStore(redis).create(**args)


async def test_verify_refusals(redis: aioredis.Redis) -> None:
    store = KeyStore(redis)
    key_id, token = await store.create("alice")
    wrong_secret = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    unknown_id = f"tdm_{'0' * 16}_{token.split('_', 2)[2]}"
    cases = [
        (None, "missing API key"),
        ("", "missing API key"),
        ("Bearer abc", "malformed API key"),
        (token + "x", "malformed API key"),
        (wrong_secret, "not recognized"),
        (unknown_id, "not recognized"),
    ]
    for presented, message in cases:
        with pytest.raises(Unauthenticated) as err:
            await store.verify(presented)
        assert message in err.value.message and "tandem keys create" in err.value.message
        assert err.value.status == "UNAUTHENTICATED"
    assert (await store.verify(token)).key_id == key_id
    # A wrong secret for a cached id does not ride on the cache.
    with pytest.raises(Unauthenticated):
        await store.verify(wrong_secret)


async def test_revocation_elsewhere_takes_effect_after_the_cache_ttl(redis: aioredis.Redis
                                                                     ) -> None:
    clock = Clock()
    router = KeyStore(redis, AuthConfig(cache_ttl_s=5.0), clock=clock)
    admin = KeyStore(redis)  # `tandem keys revoke`: another process
    key_id, token = await admin.create("alice")
    await router.verify(token)
    await admin.revoke(key_id)
    clock.now += 4.0
    assert (await router.verify(token)).key_id == key_id  # still within the TTL
    clock.now += 2.0
    with pytest.raises(Unauthenticated, match="revoked"):
        await router.verify(token)


async def test_redis_down_serves_cached_keys_and_refuses_the_rest() -> None:
    clock = Clock()
    with RedisServer() as server:
        # A client that never gives up on a reply (redis-py's default does after 5 s): only the
        # store's own timeout can end a call to a hung Redis.
        client = aioredis.Redis.from_url(server.url, socket_timeout=None)
        store = KeyStore(client, AuthConfig(cache_ttl_s=1.0, max_stale_s=30.0,
                                            redis_timeout_s=0.3), clock=clock)
        known_id, known = await store.create("alice")
        _, other = await store.create("bob")
        await store.verify(known)
        # Hung (SIGSTOP: the connection stays open, no reply ever comes; a verify that waited
        # on it would hang until pytest's timeout), then dead (connection refused).
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)
        clock.now += 10.0  # past the TTL: verify asks Redis, which does not answer
        assert (await store.verify(known)).key_id == known_id
        server.kill()
        with pytest.raises(Unavailable) as err:
            await store.verify(other)  # fail closed: never verified here, so not let in
        assert err.value.retry_after_s
        clock.now += 30.0
        with pytest.raises(Unavailable):
            await store.verify(known)  # too stale to trust
        await client.aclose()


# -- the interceptor on a real server ----------------------------------------------------------


class EchoEngine:
    """Answers the prompt's words back, a word per chunk."""

    info = EngineInfo(ServedBy("cloud", "echo-0", "echo-v1"), "echo", 256, 32, "fp32")

    def __init__(self) -> None:
        self.gate: asyncio.Event | None = None
        self.calls = 0
        self.waiting = 0

    def load(self) -> EngineLoad:
        return EngineLoad(0, 0, 4, 4)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        self.calls += 1
        if self.gate is not None:
            self.waiting += 1
            await self.gate.wait()
        words = request.prompt.split()
        for i, word in enumerate(words):
            last = i == len(words) - 1
            yield Chunk(f" {word}", (i,), "length" if last else None,
                        Usage(len(words), len(words)) if last else None)

    async def score(self, prompt: str, messages: tuple[Any, ...] = ()) -> ScoreResult:
        return ScoreResult(1.0, len(prompt.split()))

    async def start(self) -> None:
        pass

    async def stop(self, grace_s: float) -> None:
        pass


class KeySeeingServicer(EngineServicer):
    """Records which key each request ran under (what the rate limiter will read)."""

    def __init__(self, engine: EchoEngine) -> None:
        super().__init__(engine, Limits())
        self.seen: dict[str, str | None] = {}

    def _note(self, request: pb.GenerateRequest) -> None:
        key = current_key()
        self.seen[request.request_id] = key and f"{key.key_id}/{key.tier}"

    async def Generate(self, request, context):  # type: ignore[no-untyped-def]
        self._note(request)
        return await super().Generate(request, context)

    async def GenerateStream(self, request, context):  # type: ignore[no-untyped-def]
        async for chunk in super().GenerateStream(request, context):
            self._note(request)  # after the engine's awaits: still this RPC's key
            yield chunk


@pytest.fixture
async def gated(redis: aioredis.Redis):
    store = KeyStore(redis, AuthConfig(cache_ttl_s=0.0))
    engine = EchoEngine()
    servicer = KeySeeingServicer(engine)
    server, port, health = build_server(
        ServerConfig(port=0), lambda s: add_inference_servicer(s, servicer), [INFERENCE_SERVICE],
        interceptors=auth_interceptors(AuthConfig(), store))
    await server.start()
    await set_serving(health, [INFERENCE_SERVICE])
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield store, pb_grpc.InferenceStub(channel), channel, servicer
    finally:
        await channel.close()
        await server.stop(0)


async def _code(call_factory) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    """The status of a unary or streaming call (OK when it succeeds)."""
    call = call_factory()
    try:
        if isinstance(call, grpc.aio.UnaryStreamCall):
            [c async for c in call]
        else:
            await call
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def _both(stub: pb_grpc.InferenceStub, token: str | None, route: int = pb.ROUTE_AUTO,
          request_id: str = "r"):  # type: ignore[no-untyped-def]
    req = pb.GenerateRequest(prompt="hello there world", max_tokens=8, route=route,
                             request_id=request_id)
    md = (("x-api-key", token),) if token is not None else ()
    return (lambda: stub.Generate(req, metadata=md, timeout=10),
            lambda: stub.GenerateStream(req, metadata=md, timeout=10))


async def test_health_passes_and_everything_else_needs_a_key(gated) -> None:  # type: ignore
    _, stub, channel, servicer = gated
    health = health_pb2_grpc.HealthStub(channel)
    resp = await health.Check(health_pb2.HealthCheckRequest(service=INFERENCE_SERVICE), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    for factory in (*_both(stub, None), *_both(stub, "tdm_nope")):
        assert await _code(factory) == grpc.StatusCode.UNAUTHENTICATED
    for unary in (lambda: stub.Info(pb.InfoRequest(), timeout=5),
                  lambda: stub.Score(pb.ScoreRequest(prompt="x"), timeout=5)):
        assert await _code(unary) == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Generate(pb.GenerateRequest(prompt="x"), timeout=5)
    assert "missing API key" in (err.value.details() or "")
    assert servicer.engine.calls == 0  # refused before any work


async def test_valid_key_is_served_and_visible_to_the_servicer(gated) -> None:  # type: ignore
    store, stub, _, servicer = gated
    key_id, token = await store.create("alice", "gold")
    unary, stream = _both(stub, token, request_id="u")
    resp = await unary()
    assert resp.text == " hello there world"
    assert [c.text async for c in stream()] == [" hello", " there", " world"]
    assert servicer.seen == {"u": f"{key_id}/gold"}
    info = await stub.Info(pb.InfoRequest(), metadata=(("x-api-key", token),), timeout=5)
    assert info.model_name == "echo"


async def test_route_not_allowed_is_permission_denied(gated) -> None:  # type: ignore
    store, stub, _, _ = gated
    _, token = await store.create("edge-only", routes=["edge"])
    for route, code in ((pb.ROUTE_EDGE, grpc.StatusCode.OK),
                        (pb.ROUTE_CLOUD, grpc.StatusCode.PERMISSION_DENIED),
                        (pb.ROUTE_AUTO, grpc.StatusCode.PERMISSION_DENIED)):
        for factory in _both(stub, token, route):
            assert await _code(factory) == code, route
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _both(stub, token, pb.ROUTE_CLOUD)[0]()
    assert "may not use route 'cloud'" in (err.value.details() or "")


async def test_revoked_key_is_unauthenticated(gated) -> None:  # type: ignore
    store, stub, _, _ = gated
    key_id, token = await store.create("alice")
    assert await _code(_both(stub, token)[0]) == grpc.StatusCode.OK
    await store.revoke(key_id)
    for factory in _both(stub, token):
        assert await _code(factory) == grpc.StatusCode.UNAUTHENTICATED


async def test_concurrent_requests_see_their_own_key(gated) -> None:  # type: ignore
    store, stub, _, servicer = gated
    engine = servicer.engine
    engine.gate = asyncio.Event()
    keys = [await store.create(f"user-{i}", f"t{i}") for i in range(4)]
    calls = [asyncio.ensure_future(_code(_both(stub, token, request_id=key_id)[i % 2]))
             for i, (key_id, token) in enumerate(keys)]
    while engine.waiting < 4:  # all four inside the servicer at once, interleaved
        await asyncio.sleep(0.01)
    engine.gate.set()
    assert await asyncio.gather(*calls) == [grpc.StatusCode.OK] * 4
    assert servicer.seen == {key_id: f"{key_id}/t{i}" for i, (key_id, _) in enumerate(keys)}


async def test_auth_off_means_no_interceptor(redis: aioredis.Redis) -> None:
    assert auth_interceptors(AuthConfig(enabled=False), None) == []
    with pytest.raises(ValueError, match="no key store"):
        auth_interceptors(AuthConfig(), None)
    assert isinstance(auth_interceptors(AuthConfig(), KeyStore(redis))[0], ApiKeyInterceptor)
