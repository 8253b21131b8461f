"""The router's gRPC server: the Inference servicer over a backend pool, with health and drain.

``start_router`` binds the port at once but answers health NOT_SERVING until a first backend is
healthy (so a load balancer never sends traffic to a router with nothing behind it), then
SERVING. Backends are the static addresses plus, with ``config.discovery``, the live edge nodes
the control plane lists (``router.discovery``), followed while serving. ``stop`` drains like
every Tandem server, then closes the backend channels. Metrics (``RouterMetrics``: backends'
health and load read at scrape time) go to a /metrics side port.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
from grpc_health.v1.health import aio as health_aio
from prometheus_client import CollectorRegistry

from core.errors import Unavailable
from core.grpc_server import (
    INFERENCE_SERVICE,
    add_inference_servicer,
    build_server,
    drain_and_stop,
    set_not_serving,
    set_serving,
    wait_for_signal,
)
from core.metrics import MetricsConfig, MetricsEndpoint, serve_metrics
from router.backends import BackendPool
from router.config import RouterConfig
from router.discovery import NodeDiscovery, start_discovery
from router.frontdoor import FrontDoor
from router.metrics import RouterMetrics
from router.policy import RoutingPolicy
from router.servicer import RouterServicer

__all__ = ["RouterConfig", "RouterServer", "run_router", "start_router"]

log = logging.getLogger(__name__)


@dataclass
class RouterServer:
    """A running router: its port, backend pool and servicer."""

    server: grpc.aio.Server
    port: int
    pool: BackendPool
    servicer: RouterServicer
    health: health_aio.HealthServicer
    config: RouterConfig
    metrics: RouterMetrics
    metrics_endpoint: MetricsEndpoint | None = None
    discovery: NodeDiscovery | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful: NOT_SERVING, refuse new RPCs, drain in-flight ones, close backends."""
        grace = self.config.server.grace_s if grace_s is None else grace_s

        async def after_drain() -> None:
            if self.discovery is not None:
                await self.discovery.close()  # before the pool: no adds to a closed pool
            await self.pool.close()
            await self.servicer.front.close()
            if self.metrics_endpoint is not None:
                await asyncio.to_thread(self.metrics_endpoint.stop)

        await drain_and_stop(self.server, self.health, grace, after_drain=after_drain)


async def start_router(
    config: RouterConfig,
    metrics_config: MetricsConfig | None = None,
    registry: CollectorRegistry | None = None,
) -> RouterServer:
    """Start serving; returns once a backend is healthy, raises Unavailable after the timeout.

    ``metrics_config`` (default: no endpoint) says where /metrics is served from ``registry``.
    """
    pool = BackendPool(config.pool)
    metrics = RouterMetrics(registry)
    front = FrontDoor(config.front_door)
    servicer = RouterServicer(pool, RoutingPolicy(config.policy), config, metrics, front)
    metrics.watch(pool, in_flight=lambda: servicer.in_flight)
    endpoint = serve_metrics(metrics.registry, config.server.host,
                             metrics_config or MetricsConfig())
    try:
        server, port, health = build_server(
            config.server, lambda s: add_inference_servicer(s, servicer), [INFERENCE_SERVICE],
            interceptors=front.interceptors(
                lambda method, status: metrics.observe_request("none", "none", status,
                                                               method=method)),
        )
    except BaseException:
        if endpoint is not None:
            endpoint.stop()
        raise
    # grpc's health servicer answers SERVING for "" until told otherwise.
    await set_not_serving(health, [INFERENCE_SERVICE])
    await server.start()
    for address in config.backends:
        await pool.add(address)
    discovery = None
    if config.discovery is not None:
        discovery = await start_discovery(pool, config.discovery, config.backends)
    if not await pool.wait_ready(config.ready_timeout_s):
        states = "; ".join(f"{b.address}: {b.last_error}" for b in pool) or "none known"
        await server.stop(0)
        if discovery is not None:
            await discovery.close()
        await pool.close()
        if endpoint is not None:
            endpoint.stop()
        raise Unavailable(
            f"no backend became healthy within {config.ready_timeout_s:g} s ({states})")
    await set_serving(health, [INFERENCE_SERVICE])
    ready = ", ".join(f"{b.tier} {b.label}" for b in pool if b.healthy)
    log.info("router serving on %s:%d; healthy backends: %s", config.server.host, port, ready)
    return RouterServer(server, port, pool, servicer, health, config, metrics, endpoint,
                        discovery)


async def run_router(config: RouterConfig, metrics_config: MetricsConfig | None = None) -> None:
    """Serve until SIGINT/SIGTERM, then shut down gracefully (the CLI's entry point)."""
    running = await start_router(config, metrics_config)
    try:
        await wait_for_signal()
    finally:
        await running.stop()
