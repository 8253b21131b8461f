"""The control plane's gRPC server: the Control servicer behind one gate, health, metrics, and
the rollout controller's timer.

``NodeGate`` is the one place credentials are checked: ListNodes needs a router token, every
other Control method except Enroll needs ``authorization: Bearer <node credential>`` metadata
(UNAUTHENTICATED otherwise), and any method added later needs a node credential too. It also
counts every RPC by method and final status. Health and reflection pass without a credential
(load balancers and grpcurl must reach them). ``RolloutController.tick`` runs every
``tick_interval_s`` in a thread, so canaries are promoted or rolled back without an operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1.health import aio as health_aio
from prometheus_client import CollectorRegistry

from control.config import ControlConfig
from control.datadir import ControlData
from control.metrics import ControlMetrics
from control.rollout import RolloutConfig, RolloutController
from control.router_tokens import RouterTokens
from control.servicer import (
    CONTROL_SERVICE,
    CURRENT_NODE,
    CURRENT_ROUTER,
    ControlServicer,
    add_control_servicer,
)
from control.store import ControlStore
from core.auth import AuthInterceptor, metadata_value
from core.errors import TandemError
from core.grpc_server import (
    abort,
    build_server,
    drain_and_stop,
    set_serving,
    wait_for_signal,
)
from core.metrics import MetricsEndpoint, serve_metrics

log = logging.getLogger(__name__)

AUTH_HEADER = "authorization"
PUBLIC_METHODS = (f"/{CONTROL_SERVICE}/Enroll",)
# Methods for routers: a router token, never a node credential (a node has no business
# listing the fleet, and a router none acting as a node).
ROUTER_METHODS = (f"/{CONTROL_SERVICE}/ListNodes",)
UNCOUNTED_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
)


def bearer_credential(metadata: Any) -> str | None:
    """The credential of an ``authorization: Bearer <credential>`` header, if any."""
    text = metadata_value(metadata, AUTH_HEADER)
    if text is None:
        return None
    scheme, _, credential = text.strip().partition(" ")
    return credential.strip() if scheme.lower() == "bearer" else None


def _final_status(exc: BaseException | None, context: grpc.aio.ServicerContext[Any, Any]) -> str:
    if exc is None:
        return "OK"
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    code = context.code()  # set by context.abort before it raises
    return getattr(code, "name", "UNKNOWN") if code is not None else "UNKNOWN"


class NodeGate(AuthInterceptor):
    """Authenticates every non-public Control RPC (the node lands in CURRENT_NODE, a router's
    token id in CURRENT_ROUTER); counts all."""

    # Control has no client-streaming methods; refusing beats letting one in unchecked.
    client_streaming = False

    def __init__(self, store: ControlStore, metrics: ControlMetrics,
                 routers: RouterTokens) -> None:
        super().__init__(AUTH_HEADER, UNCOUNTED_PREFIXES)
        self.store = store
        self.metrics = metrics
        self.routers = routers

    def credential(self, metadata: Any) -> str | None:
        return bearer_credential(metadata)

    async def admit(self, method: str, credential: str | None, request: Any,
                    context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if method in PUBLIC_METHODS:
            return
        router = method in ROUTER_METHODS
        check = self.routers.authenticate if router else self.store.authenticate
        try:
            who = await asyncio.to_thread(check, credential or "")
        except TandemError as e:
            await abort(context, e)
        # No reset: each RPC runs in its own task (its own context), which ends with it.
        (CURRENT_ROUTER if router else CURRENT_NODE).set(who)

    def finished(self, method: str, failure: BaseException | None,
                 context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.metrics.request(method.rsplit("/", 1)[-1], _final_status(failure, context))


class RolloutTicker:
    """Runs ``controller.tick`` every ``interval_s`` (in a thread: it blocks on SQLite) until
    ``stop``."""

    def __init__(self, controller: RolloutController, interval_s: float) -> None:
        self.controller = controller
        self.interval_s = interval_s
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="rollout ticks")

    async def stop(self) -> None:
        """Let a tick under way finish (it may be writing a decision), then end."""
        self._stopping.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await asyncio.to_thread(self.controller.tick)
            except Exception:  # a busy database or a bug: the next tick tries again
                log.exception("rollout tick failed; next one in %.0f s", self.interval_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval_s)


@dataclass
class ControlServer:
    """A started control server; ``stop()`` drains it and closes the database."""

    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer
    data: ControlData
    config: ControlConfig
    registry: CollectorRegistry
    metrics_endpoint: MetricsEndpoint | None = None
    rollouts: RolloutTicker | None = None

    @property
    def address(self) -> str:
        """Where a client on this host reaches the server."""
        host = self.config.server.host
        return f"{'127.0.0.1' if host in ('', '0.0.0.0', '::', '[::]') else host}:{self.port}"

    def create_join_token(self, ttl_s: float | None = None, *, note: str = "") -> str:
        """A single-use join token (default lifetime ``config.token_ttl_s``); blocks briefly."""
        ttl = self.config.token_ttl_s if ttl_s is None else ttl_s
        return self.data.store.create_join_token(ttl, note=note)

    def create_router_token(self, *, note: str = "") -> str:
        """A router token for ListNodes (shown once; only its digest is kept)."""
        return RouterTokens(self.data.root).create(note=note)

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful: no more rollout decisions, NOT_SERVING, refuse new RPCs, let in-flight
        ones finish, close state."""
        grace = self.config.server.grace_s if grace_s is None else grace_s
        if self.rollouts is not None:
            await self.rollouts.stop()

        async def after_drain() -> None:
            # Metrics stayed scrapable through the drain; they read the database, so they stop
            # before it closes, and it closes only once no RPC can touch it.
            if self.metrics_endpoint is not None:
                await asyncio.to_thread(self.metrics_endpoint.stop)
            await asyncio.to_thread(self.data.close)

        await drain_and_stop(self.server, self.health, grace, after_drain=after_drain)


async def start_control_server(config: ControlConfig,
                               registry: CollectorRegistry | None = None,
                               rollout: RolloutConfig | None = None) -> ControlServer:
    """Open the data directory and serve tandem.v1.Control; returns once health says SERVING.

    ``rollout`` (default: the defaults, nodes stale after three heartbeat intervals) drives the
    controller that ticks in the background.
    """
    rollout = rollout or RolloutConfig(node_stale_s=3 * config.heartbeat_interval_s)
    data = await asyncio.to_thread(ControlData.open, config.data_dir)
    registry = CollectorRegistry() if registry is None else registry
    metrics = ControlMetrics(registry)
    metrics.watch(data.store, config.heartbeat_interval_s)
    servicer = ControlServicer(data, config, metrics)
    endpoint = None
    try:
        endpoint = serve_metrics(registry, config.server.host, config.metrics)
        server, port, health = build_server(
            config.server, lambda s: add_control_servicer(s, servicer), [CONTROL_SERVICE],
            interceptors=[NodeGate(data.store, metrics, RouterTokens(data.root))])
        # `tandem rollout status` in another process judges with the thresholds we decide by.
        await asyncio.to_thread(rollout.save, data.root)
        await server.start()
    except BaseException:
        if endpoint is not None:
            endpoint.stop()
        data.close()
        raise
    await set_serving(health, [CONTROL_SERVICE])
    ticker = RolloutTicker(RolloutController(data.store, rollout), rollout.tick_interval_s)
    ticker.start()
    current = data.store.current_version()
    log.info("control plane serving on %s:%d (data %s, fleet version %s, signing key %s, "
             "rollouts %s every %g s)", config.server.host, port, config.data_dir,
             current or "none", data.key.key_id,
             "decided" if rollout.auto_decide else "judged", rollout.tick_interval_s)
    return ControlServer(server, port, health, data, config, registry, endpoint, ticker)


async def run_control_server(config: ControlConfig,
                             rollout: RolloutConfig | None = None) -> None:
    """Serve until SIGINT/SIGTERM, then drain (the CLI's entry point)."""
    running = await start_control_server(config, rollout=rollout)
    try:
        await wait_for_signal()
    finally:
        log.info("draining (grace %.1f s)", running.config.server.grace_s)
        await running.stop()
