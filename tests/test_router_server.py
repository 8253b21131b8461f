"""The router over real grpc.aio servers: two EngineServicer backends (edge, cloud) on port 0.

The backends run a small deterministic engine defined here, so these tests check routing and
transport, not models: who served, why, failover, saturation and validation. End-to-end runs
with the real engines live in test_e2e_serving.py.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from core.engine_api import (
    Chunk,
    EngineInfo,
    EngineLoad,
    ScoreResult,
    ServedBy,
    Timings,
    Usage,
)
from core.engine_servicer import IN_FLIGHT_KEY, EngineServicer
from core.errors import Overloaded, Unavailable
from core.grpc_server import (
    INFERENCE_SERVICE,
    RETRY_AFTER_KEY,
    ServerConfig,
    add_inference_servicer,
    build_server,
    set_serving,
)
from core.request import GenerationRequest, Limits
from protos.tandem.v1 import inference_pb2 as pb
from protos.tandem.v1 import inference_pb2_grpc as pb_grpc
from router.backends import PoolConfig
from router.cache import CacheConfig
from router.circuit import CircuitConfig
from router.frontdoor import FrontDoorConfig
from router.policy import PolicyConfig
from router.server import RouterConfig, RouterServer, start_router

pytestmark = pytest.mark.timeout(60)

EASY = "return a new sorted list"
HARD = "zq xv plk wxq"
LOSSES = {EASY: 2.0, HARD: 6.5}
TIMEOUT = 10.0


class TableEngine:
    """Deterministic engine: answers "<tier> says <prompt words>" a word per token; Score looks
    the prompt's loss up in a table (unknown prompts are hard). ``answer_loss`` sets the loss
    Score implies for the engine's own answers (the cascade's confidence)."""

    def __init__(self, tier: str, node_id: str, *, slots: int = 4, queue_capacity: int = 4,
                 max_context: int = 256, answer_loss: float = 1.0) -> None:
        self._info = EngineInfo(ServedBy(tier, node_id, f"{tier}-v1"), f"table-{tier}",
                                max_context, 32, "fp32")
        self.slots, self.queue_capacity = slots, queue_capacity
        self.answer_loss = answer_loss
        self.in_flight = 0
        self.generate_calls = 0
        self.refuse = False
        self.gate: asyncio.Event | None = None  # when set, generation waits for it
        self.fail_after: int | None = None  # chunks to send before failing mid-stream

    @property
    def info(self) -> EngineInfo:
        return self._info

    def load(self) -> EngineLoad:
        running = min(self.in_flight, self.slots)
        return EngineLoad(running, self.in_flight - running, self.slots, self.queue_capacity)

    def answer(self, prompt: str, max_tokens: int = 32) -> list[str]:
        return [self._info.served_by.tier, "says", *prompt.split()][:max_tokens]

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        self.generate_calls += 1
        if self.refuse or self.in_flight >= self.slots + self.queue_capacity:
            raise Overloaded("queue full; retry later", retry_after_s=0.5)
        self.in_flight += 1
        try:
            if self.gate is not None:
                await self.gate.wait()
            words = self.answer(request.prompt, request.max_tokens)
            for i, word in enumerate(words):
                if i == self.fail_after:
                    raise Unavailable("edge node is draining (shutting down)")
                last = i == len(words) - 1
                yield Chunk(
                    f" {word}", (100 + i,), finish_reason="length" if last else None,
                    usage=Usage(len(request.prompt.split()) + 1, len(words)) if last else None,
                    timings=Timings(0.0, 1.0, 2.0) if last else None,
                )
                await asyncio.sleep(0)
        finally:
            self.in_flight -= 1

    async def score(self, prompt: str, messages: tuple[Any, ...] = ()) -> ScoreResult:
        tokens = len(prompt.split()) + 1  # + BOS, as the real engines count
        if prompt in LOSSES:
            return ScoreResult(LOSSES[prompt], tokens)
        base = next((p for p in LOSSES if prompt.startswith(p)), None)
        if base is None:
            return ScoreResult(9.0, tokens)
        # prompt + our answer: the mean that makes the answer's own loss ``answer_loss``.
        n = len(base.split()) + 1
        total = LOSSES[base] * (n - 1) + self.answer_loss * (tokens - n)
        return ScoreResult(total / (tokens - 1), tokens)

    async def start(self) -> None:
        pass

    async def stop(self, grace_s: float) -> None:
        pass


@dataclass
class Node:
    engine: TableEngine
    server: grpc.aio.Server
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


async def start_node(engine: TableEngine) -> Node:
    servicer = EngineServicer(engine, Limits())
    server, port, health = build_server(
        ServerConfig(port=0), lambda s: add_inference_servicer(s, servicer), [INFERENCE_SERVICE])
    await server.start()
    await set_serving(health, [INFERENCE_SERVICE])
    return Node(engine, server, port)


@dataclass
class Cluster:
    edge: Node
    cloud: Node
    router: RouterServer
    channel: grpc.aio.Channel
    stub: pb_grpc.InferenceStub
    escalations: list[tuple[str, str, str]] = field(default_factory=list)


@asynccontextmanager
async def cluster(
    edge: TableEngine | None = None, cloud: TableEngine | None = None, *,
    health_interval_s: float = 0.1, policy: PolicyConfig | None = None, **router_kw: Any,
) -> AsyncIterator[Cluster]:
    """An edge node, a cloud node and a router in front of both; everything stopped after."""
    nodes: list[Node] = []
    router: RouterServer | None = None
    escalations: list[tuple[str, str, str]] = []
    try:
        nodes.append(await start_node(edge or TableEngine("edge", "edge-1")))
        nodes.append(await start_node(cloud or TableEngine("cloud", "cloud-1", slots=8)))
        config = RouterConfig(
            backends=[n.address for n in nodes],
            policy=policy or PolicyConfig(),
            pool=PoolConfig(health_interval_s=health_interval_s, health_timeout_s=0.5,
                            circuit=CircuitConfig(failure_threshold=3, cooloff_s=30.0)),
            ready_timeout_s=5.0,
            on_escalation=lambda *args: escalations.append(args),
            # Routing is under test here, so the same request must reach a backend every time.
            front_door=FrontDoorConfig(cache=CacheConfig(enabled=False)),
            **router_kw,
        )
        router = await start_router(config)
        assert await router.pool.wait_ready(5.0, min_ready=2), "backends never became healthy"
        async with grpc.aio.insecure_channel(router.address) as channel:
            yield Cluster(nodes[0], nodes[1], router, channel, pb_grpc.InferenceStub(channel),
                          escalations)
    finally:
        if router is not None:
            await router.stop(0)
        for n in nodes:
            await n.server.stop(0)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())


def request(prompt: str, **kw: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, temperature=0.0, **{"max_tokens": 16, **kw})


def expected_text(tier: str, prompt: str) -> str:
    return "".join(f" {w}" for w in [tier, "says", *prompt.split()])


async def until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll until ``predicate`` holds (never a fixed sleep)."""
    end = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(0.01)


# -- routing -------------------------------------------------------------------------------------

def test_easy_prompt_to_the_edge_and_hard_to_the_cloud() -> None:
    async def scenario() -> None:
        async with cluster() as c:
            call = c.stub.Generate(request(EASY), timeout=TIMEOUT)
            easy = await call
            assert easy.served_by.tier == pb.TIER_EDGE and easy.served_by.node_id == "edge-1"
            assert easy.route_reason == "auto: easy prompt (edge loss 2.00 <= 4.00) -> edge edge-1"
            assert easy.text == expected_text("edge", EASY)
            assert easy.finish_reason == pb.FINISH_REASON_LENGTH and easy.usage.completion_tokens
            assert dict(await call.trailing_metadata())[IN_FLIGHT_KEY] == "0"

            hard = await c.stub.Generate(request(HARD), timeout=TIMEOUT)
            assert hard.served_by.tier == pb.TIER_CLOUD and hard.served_by.model_version == (
                "cloud-v1")
            assert hard.route_reason == "auto: hard prompt (edge loss 6.50 > 4.00) -> cloud cloud-1"
            assert hard.text == expected_text("cloud", HARD)
    run(scenario)


def test_pinned_routes_and_quality_hints_are_honoured() -> None:
    async def scenario() -> None:
        async with cluster() as c:
            r = await c.stub.Generate(request(HARD, route=pb.ROUTE_EDGE), timeout=TIMEOUT)
            assert r.served_by.tier == pb.TIER_EDGE and r.route_reason.startswith("pinned:")
            r = await c.stub.Generate(request(EASY, route=pb.ROUTE_CLOUD), timeout=TIMEOUT)
            assert r.served_by.tier == pb.TIER_CLOUD
            assert r.route_reason == "pinned: route=cloud -> cloud cloud-1"
            r = await c.stub.Generate(request(EASY, quality=pb.QUALITY_BEST), timeout=TIMEOUT)
            assert r.served_by.tier == pb.TIER_CLOUD and "quality=best" in r.route_reason
    run(scenario)


def test_prompt_too_long_for_the_edge_goes_to_the_cloud() -> None:
    async def scenario() -> None:
        async with cluster() as c:
            long_prompt = EASY + " word" * 250  # 256 edge tokens + 16 > the edge's 256
            r = await c.stub.Generate(request(long_prompt), timeout=TIMEOUT)
            assert r.served_by.tier == pb.TIER_CLOUD
            assert "does not fit the edge (prompt 256 tokens + 16 > 256)" in r.route_reason
    run(scenario)


def test_stream_is_relayed_chunk_by_chunk() -> None:
    async def scenario() -> None:
        async with cluster() as c:
            chunks = [ch async for ch in c.stub.GenerateStream(request(EASY), timeout=TIMEOUT)]
            unary = await c.stub.Generate(request(EASY), timeout=TIMEOUT)
        words = expected_text("edge", EASY).split(" ")[1:]
        assert [ch.text for ch in chunks] == [f" {w}" for w in words]
        assert [t for ch in chunks for t in ch.token_ids] == list(range(100, 100 + len(words)))
        first, last = chunks[0], chunks[-1]
        assert first.served_by.tier == pb.TIER_EDGE and first.served_by.node_id == "edge-1"
        assert first.route_reason == unary.route_reason and first.route_reason.startswith("auto:")
        assert not chunks[1].HasField("served_by")
        assert last.finish_reason == pb.FINISH_REASON_LENGTH
        assert last.usage.completion_tokens == len(words)
        assert "".join(ch.text for ch in chunks) == unary.text
    run(scenario)


def test_score_is_forwarded_to_an_edge_and_info_answers_as_router() -> None:
    async def scenario() -> None:
        async with cluster() as c:
            score = await c.stub.Score(pb.ScoreRequest(prompt=EASY), timeout=TIMEOUT)
            assert score.mean_loss == pytest.approx(2.0) and score.prompt_tokens == 6
            assert score.served_by.tier == pb.TIER_EDGE
            info = await c.stub.Info(pb.InfoRequest(), timeout=TIMEOUT)
            assert info.served_by.tier == pb.TIER_ROUTER and info.served_by.node_id == "router"
            assert info.model_name == "table-cloud" and info.max_context_tokens == 256
    run(scenario)


# -- failures ------------------------------------------------------------------------------------

def test_stopped_edge_fails_over_to_the_cloud_without_client_errors() -> None:
    async def scenario() -> None:
        edge = TableEngine("edge", "edge-1")
        # Health checks only at start: the router learns of the stop from the failures alone.
        async with cluster(edge, health_interval_s=60.0) as c:
            before = await c.stub.Generate(request(EASY, quality=pb.QUALITY_FAST), timeout=TIMEOUT)
            assert before.served_by.tier == pb.TIER_EDGE

            # One request is in flight on the edge (no token yet) when the edge stops.
            edge.gate = asyncio.Event()
            held = asyncio.ensure_future(
                c.stub.Generate(request(EASY, quality=pb.QUALITY_FAST), timeout=TIMEOUT))
            await until(lambda: edge.in_flight == 1)
            await c.edge.server.stop(0)

            answers = [await held]
            for quality in (pb.QUALITY_FAST, pb.QUALITY_DEFAULT, pb.QUALITY_FAST):
                answers.append(await c.stub.Generate(request(EASY, quality=quality),
                                                     timeout=TIMEOUT))
            assert all(a.served_by.tier == pb.TIER_CLOUD for a in answers)
            assert all(a.text == expected_text("cloud", EASY) for a in answers)
            assert "; failover: edge-1 " in answers[0].route_reason
            assert answers[1].route_reason.endswith(
                "failover: edge-1 UNAVAILABLE -> cloud cloud-1")
            # After three failures the edge's circuit is open: no more attempts on it.
            assert c.router.pool.get(c.edge.address).breaker.state == "open"  # type: ignore[union-attr]
            assert "failover" not in answers[-1].route_reason
    run(scenario)


def test_refusal_before_the_first_token_is_retried_on_the_other_tier() -> None:
    async def scenario() -> None:
        edge = TableEngine("edge", "edge-1")
        async with cluster(edge) as c:
            edge.refuse = True
            r = await c.stub.Generate(request(EASY), timeout=TIMEOUT)
            assert r.served_by.tier == pb.TIER_CLOUD
            assert r.route_reason == ("auto: easy prompt (edge loss 2.00 <= 4.00) -> edge edge-1; "
                                      "failover: edge-1 RESOURCE_EXHAUSTED -> cloud cloud-1")
            chunks = [ch async for ch in c.stub.GenerateStream(request(HARD, route=pb.ROUTE_AUTO,
                                                                       quality=pb.QUALITY_FAST),
                                                               timeout=TIMEOUT)]
            # The edge's hint is still running: the policy sends it to the cloud directly.
            assert chunks[0].served_by.tier == pb.TIER_CLOUD
            assert "edge saturated, spill-over" in chunks[0].route_reason
            assert "".join(ch.text for ch in chunks) == expected_text("cloud", HARD)
    run(scenario)


def test_everything_saturated_is_refused_fast_with_a_retry_hint() -> None:
    async def scenario() -> None:
        edge = TableEngine("edge", "edge-1", slots=1, queue_capacity=0)
        cloud = TableEngine("cloud", "cloud-1", slots=1, queue_capacity=0)
        async with cluster(edge, cloud) as c:
            edge.gate = cloud.gate = asyncio.Event()
            held = [asyncio.ensure_future(c.stub.Generate(request(EASY, route=r), timeout=TIMEOUT))
                    for r in (pb.ROUTE_EDGE, pb.ROUTE_CLOUD)]
            await until(lambda: edge.in_flight == cloud.in_flight == 1)

            # Both backends are full: their trailers said slots + queue capacity, so the
            # router refuses (or, before it has heard, tries each once) with a retry hint.
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.stub.Generate(request(EASY), timeout=TIMEOUT)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert 0 < int(dict(e.value.trailing_metadata())[RETRY_AFTER_KEY]) <= 1000
            calls = edge.generate_calls + cloud.generate_calls

            # Now the router knows: refused at once, without calling any backend.
            for route in (pb.ROUTE_AUTO, pb.ROUTE_CLOUD):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await c.stub.Generate(request(HARD, route=route), timeout=TIMEOUT)
                assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert 0 < int(dict(e.value.trailing_metadata())[RETRY_AFTER_KEY]) <= 1000
            assert edge.generate_calls + cloud.generate_calls == calls
            # Refused, not queued: a router that waited for a slot would have waited on the shut
            # gate until the deadline (DEADLINE_EXCEEDED); the two that filled them still run.
            assert edge.in_flight == cloud.in_flight == 1 and not any(h.done() for h in held)

            edge.gate.set()
            done = await asyncio.gather(*held)
            assert [r.served_by.tier for r in done] == [pb.TIER_EDGE, pb.TIER_CLOUD]
    run(scenario)


def test_failure_after_the_first_token_ends_the_stream_without_duplicates() -> None:
    async def scenario() -> None:
        edge = TableEngine("edge", "edge-1")
        async with cluster(edge) as c:
            edge.fail_after = 2
            received: list[pb.GenerateChunk] = []
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for chunk in c.stub.GenerateStream(request(EASY), timeout=TIMEOUT):
                    received.append(chunk)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "draining" in (e.value.details() or "")
            assert [ch.text for ch in received] == [" edge", " says"]  # and nothing twice
            # A unary call has sent nothing yet, so it may still fail over as a whole.
            r = await c.stub.Generate(request(EASY), timeout=TIMEOUT)
            assert r.served_by.tier == pb.TIER_CLOUD and r.text == expected_text("cloud", EASY)
            assert "failover: edge-1 UNAVAILABLE -> cloud cloud-1" in r.route_reason
    run(scenario)


def test_client_deadline_bounds_a_hung_backend() -> None:
    async def scenario() -> None:
        edge = TableEngine("edge", "edge-1")
        async with cluster(edge, first_token_timeout_s=0.3) as c:
            edge.gate = asyncio.Event()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.stub.Generate(request(EASY, route=pb.ROUTE_EDGE), timeout=0.5)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # The deadline reached the backend too: its call ended though its gate is still shut.
            await until(lambda: edge.in_flight == 0)
            # With another candidate left, a backend silent past first_token_timeout_s is
            # abandoned in time for the next one to answer.
            r = await c.stub.Generate(request(EASY, quality=pb.QUALITY_FAST), timeout=TIMEOUT)
            assert r.served_by.tier == pb.TIER_CLOUD
            assert "failover: edge-1 no first token in 0.3 s -> cloud cloud-1" in r.route_reason
            edge.gate.set()
    run(scenario)


def test_health_checks_and_pool_changes_steer_traffic() -> None:
    async def scenario() -> None:
        async with cluster() as c:
            pool, edge_address = c.router.pool, c.edge.address
            await pool.remove(edge_address)
            r = await c.stub.Generate(request(EASY), timeout=TIMEOUT)
            assert r.route_reason == "auto: no edge available -> cloud cloud-1"
            await pool.add(edge_address)
            assert await pool.wait_ready(5.0, min_ready=2)
            r = await c.stub.Generate(request(EASY), timeout=TIMEOUT)
            assert r.served_by.tier == pb.TIER_EDGE

            await c.edge.server.stop(0)
            await until(lambda: not pool.get(edge_address).healthy)  # type: ignore[union-attr]
            backend = pool.get(edge_address)
            assert backend is not None and backend.last_error.startswith("UNAVAILABLE")
            r = await c.stub.Generate(request(EASY), timeout=TIMEOUT)
            assert r.route_reason == "auto: no edge available -> cloud cloud-1"
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.stub.Generate(request(EASY, route=pb.ROUTE_EDGE), timeout=TIMEOUT)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "no edge backend is healthy" in (e.value.details() or "")
    run(scenario)


def test_invalid_requests_get_invalid_argument_with_the_tiers_messages() -> None:
    async def scenario() -> None:
        async with cluster() as c:
            cases = [(request(EASY, max_tokens=0), "max_tokens must be 1..512, got 0"),
                     (request("   "), "prompt must be non-empty text"),
                     (request(EASY, top_p=0.0), "top_p must be in (0, 1]")]
            for msg, words in cases:
                for rpc in (c.stub.Generate, c.stub.GenerateStream):
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        call = rpc(msg, timeout=TIMEOUT)
                        await (call if rpc is c.stub.Generate else _drain(call))
                    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert words in (e.value.details() or "")
            # Bytes that are not UTF-8 where the prompt goes: INVALID_ARGUMENT, not INTERNAL.
            raw = c.channel.unary_unary("/tandem.v1.Inference/Generate")
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await raw(b"\x0a\x02\xff\xfe", timeout=TIMEOUT)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.stub.Score(pb.ScoreRequest(prompt=""), timeout=TIMEOUT)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    run(scenario)


async def _drain(call: Any) -> None:
    async for _ in call:
        pass


# -- cascade -------------------------------------------------------------------------------------

@pytest.mark.parametrize("answer_loss,tier", [(0.8, pb.TIER_EDGE), (2.5, pb.TIER_CLOUD)])
def test_cascade_escalates_only_low_confidence_answers(answer_loss: float, tier: int) -> None:
    async def scenario() -> None:
        edge = TableEngine("edge", "edge-1", answer_loss=answer_loss)
        async with cluster(edge, policy=PolicyConfig(cascade=True)) as c:
            r = await c.stub.Generate(request(HARD), timeout=TIMEOUT)
            chunks = [ch async for ch in c.stub.GenerateStream(request(HARD), timeout=TIMEOUT)]
            assert r.served_by.tier == tier and chunks[0].served_by.tier == tier
            assert chunks[0].route_reason == r.route_reason
            assert "".join(ch.text for ch in chunks) == r.text
            if tier == pb.TIER_EDGE:
                assert r.route_reason == (
                    "cascade: edge confident (answer loss 0.80 <= 1.50) -> edge edge-1")
                assert c.escalations == []
            else:
                assert r.route_reason == (
                    "cascade: escalated (edge answer loss 2.50 > 1.50) -> cloud cloud-1")
                assert [e[:3] for e in c.escalations] == [
                    (HARD, expected_text("edge", HARD), expected_text("cloud", HARD))] * 2
                # The site that escalated is named, so its log feeds its next training round.
                assert {e[3] for e in c.escalations} == {"edge-1"}
    run(scenario)


# -- start and health ----------------------------------------------------------------------------

def test_router_health_turns_serving_only_with_a_healthy_backend() -> None:
    async def scenario() -> None:
        with socket.socket() as s:  # a port nothing listens on
            s.bind(("127.0.0.1", 0))
            dead = f"127.0.0.1:{s.getsockname()[1]}"
        # It gives up at its own ready timeout (were it to hang, pytest's timeout fails it).
        with pytest.raises(Unavailable, match=r"no backend became healthy within 0\.5 s"):
            await start_router(RouterConfig(backends=[dead], ready_timeout_s=0.5))

        async with cluster() as c:
            health = health_pb2_grpc.HealthStub(c.channel)
            for service in ("", INFERENCE_SERVICE):
                resp = await health.Check(health_pb2.HealthCheckRequest(service=service),
                                          timeout=TIMEOUT)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
    run(scenario)


def test_router_config_is_checked() -> None:
    with pytest.raises(ValueError, match="at least one backend"):
        RouterConfig(backends=[])
    with pytest.raises(ValueError, match="HOST:PORT"):
        RouterConfig(backends=["localhost"])


def test_router_learns_a_swapped_model_version_from_responses() -> None:
    """A hot swap changes no health state; the router must still see the new version."""

    async def scenario() -> None:
        edge = TableEngine("edge", "edge-1")
        async with cluster(edge) as c:
            await c.stub.Generate(request(EASY, route=pb.ROUTE_EDGE), timeout=TIMEOUT)
            backend = next(b for b in c.router.pool if b.tier == "edge")
            assert backend.info is not None
            assert backend.info.served_by.model_version == "edge-v1"
            edge._info = replace(edge._info, served_by=replace(edge._info.served_by,
                                                              model_version="edge-v2"))
            r = await c.stub.Generate(request(EASY, route=pb.ROUTE_EDGE), timeout=TIMEOUT)
            assert r.served_by.model_version == "edge-v2"
            assert backend.info.served_by.model_version == "edge-v2"
            assert backend.info.max_context == edge._info.max_context  # the rest is kept
    run(scenario)
