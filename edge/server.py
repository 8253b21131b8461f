"""The edge node's gRPC server: the shared tandem.v1.Inference servicer over the edge engine.

The port is bound and health answers NOT_SERVING while the artifact is verified and loaded;
health turns SERVING only after one warm-up generation, so a router never sends the first user
request to a cold model.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import grpc
from grpc_health.v1.health import aio as health_aio
from prometheus_client import CollectorRegistry

from edge.engine import EdgeEngine, EdgeEngineConfig
from tandem.request import GenerationRequest
from tandem.serving.grpc_server import (
    INFERENCE_SERVICE,
    ServerConfig,
    add_inference_servicer,
    build_server,
    drain_and_stop,
    set_serving,
    wait_for_signal,
)
from tandem.serving.metrics import MetricsConfig, MetricsEndpoint, ServingMetrics, serve_metrics
from tandem.serving.servicer import EngineServicer

log = logging.getLogger(__name__)

WARMUP_PROMPT = "Return the"


@dataclass(frozen=True)
class EdgeServerConfig:
    """The edge engine and where its server listens."""

    engine: EdgeEngineConfig
    server: ServerConfig = field(default_factory=ServerConfig)
    # Off unless asked: programmatic servers (tests) share one process and one host.
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


@dataclass
class EdgeServer:
    """A started edge server; ``stop()`` drains it."""

    server: grpc.aio.Server
    port: int
    engine: EdgeEngine
    health: health_aio.HealthServicer
    grace_s: float
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    metrics_endpoint: MetricsEndpoint | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful: NOT_SERVING, refuse new RPCs, let in-flight ones finish, stop the engine."""
        grace = self.grace_s if grace_s is None else grace_s

        async def after_drain() -> None:
            await self.engine.stop(grace)
            # Last: metrics stay scrapable while the node drains.
            if self.metrics_endpoint is not None:
                await asyncio.to_thread(self.metrics_endpoint.stop)

        await drain_and_stop(self.server, self.health, grace, after_drain=after_drain)


async def start_edge_server(
    config: EdgeServerConfig, registry: CollectorRegistry | None = None
) -> EdgeServer:
    """Bind, start, load and warm the model, then report SERVING; returns the running server."""
    engine = EdgeEngine(config.engine)
    registry = CollectorRegistry() if registry is None else registry
    servicer = EngineServicer(engine, config.engine.limits, ServingMetrics(registry, engine))
    endpoint = serve_metrics(registry, config.server.host, config.metrics)
    try:
        server, port, health = build_server(
            config.server, lambda s: add_inference_servicer(s, servicer), [INFERENCE_SERVICE]
        )
    except BaseException:
        if endpoint is not None:
            endpoint.stop()
        raise
    await server.start()
    try:
        await engine.start()
        # One short generation runs ORT's first-call allocations before real traffic does.
        async for _ in engine.generate(
            GenerationRequest(prompt=WARMUP_PROMPT, max_tokens=2, temperature=0.0)
        ):
            pass
    except BaseException:
        await server.stop(None)
        await engine.stop(0.0)
        if endpoint is not None:
            endpoint.stop()
        raise
    await set_serving(health, [INFERENCE_SERVICE])
    log.info("edge node %s ready: %s, health SERVING", config.engine.node_id,
             engine.info.served_by.model_version)
    return EdgeServer(server, port, engine, health, config.server.grace_s, registry, endpoint)


async def run_edge_server(config: EdgeServerConfig) -> None:
    """Serve until SIGINT/SIGTERM, then shut down gracefully (the CLI's entry point)."""
    running = await start_edge_server(config)
    log.info("edge node %s listening on %s:%d (Ctrl-C drains and stops)",
             config.engine.node_id, config.server.host, running.port)
    try:
        await wait_for_signal()
    finally:
        log.info("edge node %s: draining (grace %.1f s)", config.engine.node_id,
                 config.server.grace_s)
        await running.stop()
