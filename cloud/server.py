"""The cloud tier's gRPC server: the shared engine server over the continuous-batching engine."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from cloud.engine import CloudEngine, CloudEngineConfig
from core.engine_server import EngineServer, serve_until_signal, start_engine_server
from core.grpc_server import ServerConfig
from core.metrics import MetricsConfig

CloudServer = EngineServer


@dataclass(frozen=True)
class CloudServerConfig:
    engine: CloudEngineConfig
    server: ServerConfig = field(default_factory=ServerConfig)
    # Off unless asked: programmatic servers (tests) share one process and one host.
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


async def start_cloud_server(
    config: CloudServerConfig, registry: CollectorRegistry | None = None
) -> EngineServer:
    """Load the model (off the event loop), warm it up, start serving."""
    engine = await asyncio.to_thread(CloudEngine, config.engine)
    return await start_engine_server(engine, config.engine.limits, config.server,
                                     config.metrics, registry)


async def run_cloud_server(config: CloudServerConfig) -> None:
    """Serve until SIGINT/SIGTERM, then shut down gracefully (the CLI's entry point)."""
    await serve_until_signal(await start_cloud_server(config))
