"""Prometheus metrics over real servers: a cloud tier and a router, scraped on their ports."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from cloud.engine import CloudEngineConfig
from cloud.scheduler import SchedulerConfig
from cloud.server import CloudServer, CloudServerConfig, start_cloud_server
from core.engine_api import Chunk, EngineInfo, EngineLoad, ScoreResult, ServedBy
from core.engine_servicer import EngineServicer
from core.grpc_server import (
    INFERENCE_SERVICE,
    ServerConfig,
    add_inference_servicer,
    build_server,
)
from core.metrics import MetricsConfig, ServingMetrics, start_metrics_server
from core.request import GenerationRequest, Limits
from model.demo import DEMO_DIR
from protos.tandem.v1 import inference_pb2 as pb
from protos.tandem.v1 import inference_pb2_grpc
from router.config import RouterConfig
from router.metrics import RouterMetrics
from router.policy import BackendSnapshot
from router.server import start_router

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    """GET /metrics and index every sample by (name, labels)."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def cloud() -> AsyncIterator[CloudServer]:
    server = await start_cloud_server(CloudServerConfig(
        engine=CloudEngineConfig(checkpoint=DEMO_DIR / "cloud",
                                 scheduler=SchedulerConfig(slots=2, max_queue=3)),
        server=ServerConfig(port=0, grace_s=5.0),
        metrics=MetricsConfig(port=0),
    ))
    try:
        yield server
    finally:
        await server.stop(1.0)


@pytest.mark.asyncio(loop_scope="module")
async def test_cloud_server_counts_every_rpc(cloud: CloudServer) -> None:
    assert cloud.metrics_endpoint is not None
    async with grpc.aio.insecure_channel(cloud.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        req = pb.GenerateRequest(prompt="Return a new list", max_tokens=6, temperature=0.0)
        resp = await stub.Generate(req, timeout=30)
        chunks = [c async for c in stub.GenerateStream(req, timeout=30)]
        bad = pb.GenerateRequest(prompt="hello", max_tokens=0)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Generate(bad, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as err:
            [c async for c in stub.GenerateStream(bad, timeout=10)]
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        await stub.Score(pb.ScoreRequest(prompt="Return a new list"), timeout=10)
        await stub.Info(pb.InfoRequest(), timeout=10)

    m = await asyncio.to_thread(scrape, cloud.metrics_endpoint.url)
    ok = {"route": "auto", "tier": "cloud", "status": "OK"}
    assert value(m, "tandem_requests_total", method="Generate", **ok) == 1
    assert value(m, "tandem_requests_total", method="GenerateStream", **ok) == 1
    # Rejected before the route was read: route "none", and no latency for an error.
    for method in ("Generate", "GenerateStream"):
        assert value(m, "tandem_requests_total", method=method, route="none", tier="cloud",
                     status="INVALID_ARGUMENT") == 1
    for method in ("Score", "Info"):
        assert value(m, "tandem_requests_total", method=method, route="none", tier="cloud",
                     status="OK") == 1
    for hist in ("tandem_time_to_first_token_seconds", "tandem_request_duration_seconds"):
        assert value(m, f"{hist}_count", route="auto", tier="cloud") == 2
        assert value(m, f"{hist}_bucket", route="auto", tier="cloud", le="+Inf") == 2
        assert value(m, f"{hist}_bucket", route="auto", tier="cloud", le="0.5") is not None
    assert value(m, "tandem_time_to_first_token_seconds_sum", route="auto", tier="cloud") == (
        pytest.approx((resp.timings.time_to_first_token_ms
                        + chunks[-1].timings.time_to_first_token_ms) / 1000))
    assert value(m, "tandem_generated_tokens_total", tier="cloud") == (
        resp.usage.completion_tokens + chunks[-1].usage.completion_tokens)
    assert value(m, "tandem_prompt_tokens_total", tier="cloud") == 2 * resp.usage.prompt_tokens
    assert value(m, "tandem_queue_wait_seconds_count", tier="cloud") == 2

    assert value(m, "tandem_in_flight_requests") == 0
    assert value(m, "tandem_queue_depth_requests") == 0
    assert value(m, "tandem_decode_slots") == 2
    assert value(m, "tandem_queue_capacity_requests") == 3
    served = cloud.engine.info.served_by
    assert value(m, "tandem_model_info", tier="cloud", node="cloud-0",
                 version=served.model_version, model=cloud.engine.info.model_name,
                 precision=cloud.engine.info.precision) == 1
    assert value(m, "tandem_process_cpu_seconds_total")
    assert 0 < value(m, "tandem_memory_used_bytes") <= value(m, "tandem_memory_limit_bytes")
    assert value(m, "tandem_process_resident_memory_bytes")
    # torch is imported but CUDA never initialized on a CPU machine: no GPU series.
    assert not any(n.startswith("tandem_gpu_") for n in names(m))
    # Nothing per request becomes a label.
    assert all("request_id" not in dict(labels) and "prompt" not in dict(labels)
               for _, labels in m)


@pytest.mark.asyncio(loop_scope="module")
async def test_router_exports_backend_health(cloud: CloudServer) -> None:
    router = await start_router(
        RouterConfig(backends=[cloud.address], server=ServerConfig(port=0, grace_s=1.0),
                     ready_timeout_s=10.0),
        MetricsConfig(port=0),
    )
    try:
        assert router.metrics_endpoint is not None
        router.metrics.observe_request("auto", "cloud", "OK", 0.02, 0.1, 5)
        m = await asyncio.to_thread(scrape, router.metrics_endpoint.url)
        backend = {"backend": cloud.address, "tier": "cloud", "node": "cloud-0"}
        assert value(m, "tandem_router_backend_up", **backend) == 1
        assert value(m, "tandem_router_backend_circuit_open", **backend) == 0
        assert value(m, "tandem_router_backend_model_info", **backend,
                     version=cloud.engine.info.served_by.model_version) == 1
        assert value(m, "tandem_router_in_flight_requests") == 0
        assert value(m, "tandem_router_requests_total", method="Generate", route="auto",
                     tier="cloud", status="OK") == 1
        assert "tandem_process_cpu_seconds_total" in names(m)
    finally:
        await router.stop(1.0)


def test_router_metrics_methods() -> None:
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry)
    metrics.observe_request("auto", "edge", "OK", ttft_s=0.03, e2e_s=0.4, tokens=12)
    metrics.observe_request("cloud", "none", "UNAVAILABLE")
    metrics.observe_request("bogus", "nowhere", "NOT_A_STATUS")  # folded, never a new series
    metrics.cache_hit()
    metrics.cache_hit()
    metrics.cache_miss()
    metrics.rate_limited("free")
    metrics.escalation()

    def get(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert get("tandem_router_requests_total", method="Generate", route="auto", tier="edge",
               status="OK") == 1
    assert get("tandem_router_requests_total", method="Generate", route="cloud", tier="none",
               status="UNAVAILABLE") == 1
    assert get("tandem_router_requests_total", method="Generate", route="unknown",
               tier="unknown", status="UNKNOWN") == 1
    assert get("tandem_router_time_to_first_token_seconds_bucket", route="auto", tier="edge",
               le="0.05") == 1
    assert get("tandem_router_time_to_first_token_seconds_bucket", route="auto", tier="edge",
               le="0.025") == 0
    assert get("tandem_router_request_duration_seconds_sum", route="auto", tier="edge") == 0.4
    # Failures have no latency to report.
    assert get("tandem_router_time_to_first_token_seconds_count", route="cloud",
               tier="none") is None
    assert get("tandem_router_generated_tokens_total", tier="edge") == 12
    assert get("tandem_router_cache_hits_total") == 2
    assert get("tandem_router_cache_misses_total") == 1
    assert get("tandem_router_rate_limited_total", key_tier="free") == 1
    assert get("tandem_router_escalations_total") == 1


def test_router_metrics_read_the_pool_at_scrape_time() -> None:
    class Pool:
        def __init__(self) -> None:
            self.snaps: list[BackendSnapshot] = []

        def snapshots(self) -> list[BackendSnapshot]:
            return self.snaps

    pool, registry = Pool(), CollectorRegistry()
    RouterMetrics(registry).watch(pool, in_flight=lambda: 3)
    pool.snaps = [
        BackendSnapshot(name="10.0.0.4:50061", tier="edge", node_id="edge-1",
                        model_version="demo-edge-1", in_flight=2, queue_depth=1),
        BackendSnapshot(name="10.0.0.5:50061", tier=None, healthy=False, circuit="open"),
    ]
    edge = {"backend": "10.0.0.4:50061", "tier": "edge", "node": "edge-1"}
    never = {"backend": "10.0.0.5:50061", "tier": "unknown", "node": "10.0.0.5:50061"}
    assert registry.get_sample_value("tandem_router_backend_up", edge) == 1
    assert registry.get_sample_value("tandem_router_backend_in_flight_requests", edge) == 2
    assert registry.get_sample_value("tandem_router_backend_queue_depth_requests", edge) == 1
    assert registry.get_sample_value("tandem_router_backend_model_info",
                                     {**edge, "version": "demo-edge-1"}) == 1
    assert registry.get_sample_value("tandem_router_backend_up", never) == 0
    assert registry.get_sample_value("tandem_router_backend_circuit_open", never) == 1
    assert registry.get_sample_value("tandem_router_in_flight_requests") == 3
    pool.snaps = []  # a removed backend disappears with the next scrape
    assert registry.get_sample_value("tandem_router_backend_up", edge) is None


@dataclass
class GatedEngine:
    """An engine whose generations wait for ``gate``: the client gives up first."""

    gate: asyncio.Event

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(ServedBy("edge", "edge-9", "v1"), "gated", 64, 8, "fp32")

    def load(self) -> EngineLoad:
        return EngineLoad(0, 0, 1, 1)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        yield Chunk("first", (1,))
        await self.gate.wait()
        yield Chunk(" last", (2,), finish_reason="length")

    async def score(self, prompt: str, messages: tuple[Any, ...] = ()) -> ScoreResult:
        return ScoreResult(1.0, 1)

    async def start(self) -> None:
        pass

    async def stop(self, grace_s: float) -> None:
        pass


async def test_cancelled_and_expired_streams_are_counted() -> None:
    registry = CollectorRegistry()
    engine = GatedEngine(asyncio.Event())
    servicer = EngineServicer(engine, Limits(), ServingMetrics(registry, engine))
    server, port, _ = build_server(ServerConfig(port=0),
                                   lambda s: add_inference_servicer(s, servicer),
                                   [INFERENCE_SERVICE])
    await server.start()

    def count(status: str) -> float:
        return registry.get_sample_value("tandem_requests_total", {
            "method": "GenerateStream", "route": "edge", "tier": "edge", "status": status}) or 0

    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            req = pb.GenerateRequest(prompt="hi", max_tokens=2, route=pb.ROUTE_EDGE)
            call = stub.GenerateStream(req, timeout=30)
            await call.read()
            call.cancel()
            expired = stub.GenerateStream(req, timeout=0.3)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [c async for c in expired]
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            for _ in range(100):  # the server learns of a cancellation a moment later
                if count("CANCELLED") and count("DEADLINE_EXCEEDED"):
                    break
                await asyncio.sleep(0.02)
        assert count("CANCELLED") == 1 and count("DEADLINE_EXCEEDED") == 1
        assert count("OK") == 0
    finally:
        await server.stop(0)


def test_metrics_port_taken() -> None:
    registry = CollectorRegistry()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{taken}"):
            start_metrics_server(registry, "127.0.0.1", taken)
        # A default port may be held by a sibling: take another, and say so.
        endpoint = start_metrics_server(registry, "127.0.0.1", taken, fallback_to_free_port=True)
        try:
            assert endpoint.port not in (0, taken)
            assert scrape(endpoint.url) == {}
        finally:
            endpoint.stop()
    # Stopped means the port is closed.
    with pytest.raises(OSError):
        urllib.request.urlopen(endpoint.url, timeout=2)


def test_metrics_config_from_flags() -> None:
    assert MetricsConfig.from_flags(None, 9192, disabled=False) == MetricsConfig(9192, True)
    assert MetricsConfig.from_flags(9300, 9192, disabled=False) == MetricsConfig(9300, False)
    assert MetricsConfig.from_flags(0, 9192, disabled=False) == MetricsConfig(0, False)
    assert MetricsConfig.from_flags(9300, 9192, disabled=True).port is None
