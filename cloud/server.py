"""The cloud tier's gRPC server: the shared Inference servicer over the batching engine."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import grpc
from grpc_health.v1.health import aio as health_aio

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
from tandem.serving.servicer import EngineServicer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CloudServerConfig:
    engine: CloudEngineConfig
    server: ServerConfig = field(default_factory=ServerConfig)


@dataclass
class CloudServer:
    server: grpc.aio.Server
    port: int
    engine: CloudEngine
    health: health_aio.HealthServicer
    grace_s: float

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful: NOT_SERVING, refuse new RPCs, drain in-flight ones, stop the engine."""
        grace = self.grace_s if grace_s is None else grace_s
        await drain_and_stop(self.server, self.health, grace,
                             after_drain=lambda: self.engine.stop(grace))


async def start_cloud_server(config: CloudServerConfig) -> CloudServer:
    """Load the model, warm it up, start serving; health turns SERVING only when ready."""
    engine = await asyncio.to_thread(CloudEngine, config.engine)
    servicer = EngineServicer(engine, config.engine.limits)
    server, port, health = build_server(
        config.server, lambda s: add_inference_servicer(s, servicer), [INFERENCE_SERVICE]
    )
    await server.start()
    await engine.start()
    # One short generation compiles kernels and touches every weight before traffic arrives.
    async for _ in engine.generate(GenerationRequest(prompt="warm up", max_tokens=2)):
        pass
    await set_serving(health, [INFERENCE_SERVICE])
    log.info("cloud tier serving %s on port %d", engine.info.served_by.model_version, port)
    return CloudServer(server, port, engine, health, config.server.grace_s)


async def run_cloud_server(config: CloudServerConfig) -> None:
    """Serve until SIGINT/SIGTERM, then shut down gracefully (the CLI's entry point)."""
    running = await start_cloud_server(config)
    print(f"cloud tier listening on {config.server.host}:{running.port}", flush=True)
    try:
        await wait_for_signal()
    finally:
        await running.stop()
