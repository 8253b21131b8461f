"""The edge node's gRPC server: the shared engine server over the onnxruntime-genai engine."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from core.engine_server import EngineServer, serve_until_signal, start_engine_server
from core.grpc_server import ServerConfig
from core.metrics import MetricsConfig
from edge.config import EdgeEngineConfig
from edge.engine import EdgeEngine

EdgeServer = EngineServer


@dataclass(frozen=True)
class EdgeServerConfig:
    """The edge engine and where its server listens."""

    engine: EdgeEngineConfig
    server: ServerConfig = field(default_factory=ServerConfig)
    # Off unless asked: programmatic servers (tests) share one process and one host.
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


async def start_edge_server(
    config: EdgeServerConfig, registry: CollectorRegistry | None = None
) -> EngineServer:
    """Load and warm the artifact, then report SERVING; returns the running server."""
    return await start_engine_server(EdgeEngine(config.engine), config.engine.limits,
                                     config.server, config.metrics, registry)


async def run_edge_server(config: EdgeServerConfig) -> None:
    """Serve until SIGINT/SIGTERM, then shut down gracefully (the CLI's entry point)."""
    await serve_until_signal(await start_edge_server(config))
