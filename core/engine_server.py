"""One gRPC server for any engine (cloud or edge): servicer, health, metrics, warm-up, drain.

``start_engine_server`` binds and starts the server with health NOT_SERVING, starts the engine,
runs one short generation (first-call allocations, kernel compilation, every weight touched),
and only then reports SERVING. ``EngineServer.stop`` drains like every Tandem server.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import grpc
from grpc_health.v1.health import aio as health_aio
from prometheus_client import CollectorRegistry

from core.engine_api import Engine
from core.engine_servicer import EngineServicer
from core.grpc_server import (
    INFERENCE_SERVICE,
    ServerConfig,
    add_inference_servicer,
    build_server,
    drain_and_stop,
    set_serving,
    wait_for_signal,
)
from core.metrics import MetricsConfig, MetricsEndpoint, ServingMetrics, serve_metrics
from core.request import GenerationRequest, Limits

log = logging.getLogger(__name__)

WARMUP_PROMPT = "Return the"


@dataclass
class EngineServer:
    """A started server; ``stop()`` drains it."""

    server: grpc.aio.Server
    port: int
    engine: Engine
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
            # Last: metrics stay scrapable while the server drains.
            if self.metrics_endpoint is not None:
                await asyncio.to_thread(self.metrics_endpoint.stop)

        await drain_and_stop(self.server, self.health, grace, after_drain=after_drain)


async def start_engine_server(
    engine: Engine,
    limits: Limits,
    server_config: ServerConfig,
    metrics_config: MetricsConfig,
    registry: CollectorRegistry | None = None,
) -> EngineServer:
    """Serve ``engine``; returns once it is warm and health says SERVING."""
    registry = CollectorRegistry() if registry is None else registry
    servicer = EngineServicer(engine, limits, ServingMetrics(registry, engine))
    endpoint = serve_metrics(registry, server_config.host, metrics_config)
    try:
        server, port, health = build_server(
            server_config, lambda s: add_inference_servicer(s, servicer), [INFERENCE_SERVICE]
        )
    except BaseException:
        if endpoint is not None:
            endpoint.stop()
        raise
    await server.start()
    try:
        await engine.start()
        warm = GenerationRequest(prompt=WARMUP_PROMPT, max_tokens=2, temperature=0.0)
        async for _ in engine.generate(warm):
            pass
    except BaseException:
        await server.stop(None)
        await engine.stop(0.0)
        if endpoint is not None:
            endpoint.stop()
        raise
    await set_serving(health, [INFERENCE_SERVICE])
    served = engine.info.served_by
    log.info("%s %s serving %s on %s:%d", served.tier, served.node_id, served.model_version,
             server_config.host, port)
    return EngineServer(server, port, engine, health, server_config.grace_s, registry, endpoint)


async def serve_until_signal(running: EngineServer) -> None:
    """Serve until SIGINT/SIGTERM, then drain (the CLI's entry point)."""
    try:
        await wait_for_signal()
    finally:
        log.info("draining (grace %.1f s)", running.grace_s)
        await running.stop()
