"""The cloud tier's gRPC server: the shared Inference servicer over the batching engine."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import grpc
from grpc_health.v1.health import aio as health_aio
from prometheus_client import CollectorRegistry

from cloud.engine import CloudEngine, CloudEngineConfig
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


@dataclass(frozen=True)
class CloudServerConfig:
    engine: CloudEngineConfig
    server: ServerConfig = field(default_factory=ServerConfig)
    # Off unless asked: programmatic servers (tests) share one process and one host.
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


@dataclass
class CloudServer:
    server: grpc.aio.Server
    port: int
    engine: CloudEngine
    health: health_aio.HealthServicer
    grace_s: float
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    metrics_endpoint: MetricsEndpoint | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful: NOT_SERVING, refuse new RPCs, drain in-flight ones, stop the engine."""
        grace = self.grace_s if grace_s is None else grace_s

        async def after_drain() -> None:
            await self.engine.stop(grace)
            # Last: metrics stay scrapable while the server drains.
            if self.metrics_endpoint is not None:
                await asyncio.to_thread(self.metrics_endpoint.stop)

        await drain_and_stop(self.server, self.health, grace, after_drain=after_drain)


async def start_cloud_server(
    config: CloudServerConfig, registry: CollectorRegistry | None = None
) -> CloudServer:
    """Load the model, warm it up, start serving; health turns SERVING only when ready."""
    engine = await asyncio.to_thread(CloudEngine, config.engine)
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
    await engine.start()
    # One short generation compiles kernels and touches every weight before traffic arrives.
    async for _ in engine.generate(GenerationRequest(prompt="warm up", max_tokens=2)):
        pass
    await set_serving(health, [INFERENCE_SERVICE])
    log.info("cloud tier serving %s on port %d", engine.info.served_by.model_version, port)
    return CloudServer(server, port, engine, health, config.server.grace_s, registry, endpoint)


async def run_cloud_server(config: CloudServerConfig) -> None:
    """Serve until SIGINT/SIGTERM, then shut down gracefully (the CLI's entry point)."""
    running = await start_cloud_server(config)
    print(f"cloud tier listening on {config.server.host}:{running.port}", flush=True)
    try:
        await wait_for_signal()
    finally:
        await running.stop()
