"""The router's backends: a channel, stubs, health checker, breaker and stats each; and the pool.

Every backend is checked with grpc.health.v1 ``Check`` every ``health_interval_s`` under a short
deadline. When it becomes healthy its ``Info`` is read to learn the tier, node id, model version
and context size (again after every recovery: a restarted node may serve a new model). The
``BackendPool`` holds them by address, with ``add``/``remove`` so a control plane can feed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from core import convert
from core.engine_api import EngineInfo
from core.engine_servicer import IN_FLIGHT_KEY, QUEUE_CAPACITY_KEY, QUEUE_DEPTH_KEY, SLOTS_KEY
from core.grpc_server import INFERENCE_SERVICE, RETRY_AFTER_KEY
from protos.tandem.v1 import inference_pb2 as pb
from protos.tandem.v1 import inference_pb2_grpc as pb_grpc
from router.circuit import CircuitBreaker, CircuitConfig
from router.policy import CLOUD, TIERS, BackendSnapshot
from router.stats import BackendStats, StatsConfig

log = logging.getLogger(__name__)

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    # A restarted backend must be found within a health interval or two, not after grpc's
    # default reconnect backoff (which grows to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    # Pings find a dead peer on a quiet connection; servers permit one every 10 s.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Same ceiling as our servers accept.
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    # A backend may be many pods: a dns:/// target on a headless Service resolves to each,
    # and calls spread over them (one address: the same as the default pick-first).
    ("grpc.lb_policy_name", "round_robin"),
]


@dataclass(frozen=True)
class PoolConfig:
    """How backends are checked, when their circuits open, and how their stats average."""

    health_interval_s: float = 1.0
    # A LAN or WAN round trip is well under this; a backend slower to say "SERVING" is not.
    health_timeout_s: float = 0.5
    circuit: CircuitConfig = field(default_factory=CircuitConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)


@dataclass(frozen=True)
class LoadTrailers:
    """Load and retry hint parsed from a backend's trailing metadata."""

    in_flight: int | None = None
    queue_depth: int | None = None
    slots: int | None = None
    queue_capacity: int | None = None
    retry_after_s: float | None = None


def parse_trailers(metadata: Iterable[tuple[str, Any]] | None) -> LoadTrailers:
    """Read tandem load keys and retry-after-ms; unknown or malformed values are ignored."""
    values = {k: v for k, v in (metadata or ())}

    def number(key: str) -> int | None:
        try:
            return int(values[key])
        except (KeyError, TypeError, ValueError):
            return None

    retry_ms = number(RETRY_AFTER_KEY)
    return LoadTrailers(
        in_flight=number(IN_FLIGHT_KEY), queue_depth=number(QUEUE_DEPTH_KEY),
        slots=number(SLOTS_KEY), queue_capacity=number(QUEUE_CAPACITY_KEY),
        retry_after_s=None if retry_ms is None else retry_ms / 1000.0,
    )


def info_from_proto(msg: pb.InfoResponse) -> EngineInfo:
    return EngineInfo(
        served_by=convert.served_by_from_proto(msg.served_by), model_name=msg.model_name,
        max_context=msg.max_context_tokens, max_new_tokens=msg.max_new_tokens,
        precision=msg.precision,
    )


class Backend:
    """One backend endpoint as the router sees it."""

    def __init__(
        self,
        address: str,
        config: PoolConfig,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[], Any] | None = None,
    ) -> None:
        self.address = address
        self.config = config
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.inference = pb_grpc.InferenceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.breaker = CircuitBreaker(config.circuit, clock)
        self.stats = BackendStats(config.stats, clock)
        self.info: EngineInfo | None = None
        self.healthy = False
        self.last_error = "not checked yet"
        self._on_change = on_change
        self._task: asyncio.Task[None] | None = None

    @property
    def tier(self) -> str | None:
        if self.info is None:
            return None
        tier = self.info.served_by.tier
        # A router in front of a router: the one behind fronts a whole deployment, cloud-like.
        return CLOUD if tier == "router" else tier if tier in TIERS else None

    @property
    def label(self) -> str:
        return self.info.served_by.node_id if self.info and self.info.served_by.node_id else (
            self.address)

    def start(self) -> None:
        """Run the health checker in the background (the first check happens at once)."""
        if self._task is None:
            self._task = asyncio.create_task(self._check_loop(), name=f"health {self.address}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.channel.close()

    async def check(self) -> bool:
        """One health check (plus Info on recovery); updates and returns ``healthy``."""
        timeout = self.config.health_timeout_s
        error = ""
        try:
            # The health stubs declare HealthStub without its methods (see core/launcher.py).
            resp = await self.health.Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(service=INFERENCE_SERVICE), timeout=timeout)
            if resp.status != health_pb2.HealthCheckResponse.SERVING:
                error = f"health {health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}"
            elif self.info is None or not self.healthy:
                call = self.inference.Info(pb.InfoRequest(), timeout=timeout)
                info = info_from_proto(await call)
                self.observe_trailers(await call.trailing_metadata())
                if info.served_by.tier not in (*TIERS, "router"):
                    error = f"Info reports an unknown tier {info.served_by.tier!r}"
                else:
                    self.info = info
        except grpc.aio.AioRpcError as e:
            error = f"{e.code().name}: {e.details()}"
        healthy = not error
        changed = healthy != self.healthy
        self.healthy, self.last_error = healthy, error
        if changed:
            if healthy:
                known = self.info
                assert known is not None
                log.info("backend %s is healthy: %s %s, model %s, context %d", self.address,
                         known.served_by.tier, known.served_by.node_id,
                         known.served_by.model_version, known.max_context)
            else:
                log.warning("backend %s is unhealthy: %s", self.address, error)
            if self._on_change is not None:
                await self._on_change()
        return healthy

    async def _check_loop(self) -> None:
        while True:
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in a check must not end health checking for good
                log.exception("health check of %s failed", self.address)
            await asyncio.sleep(self.config.health_interval_s)

    def observe_version(self, model_version: str) -> None:
        """A response named the model that served it; a swapped node keeps its other info."""
        info = self.info
        if info is not None and model_version and model_version != info.served_by.model_version:
            log.info("backend %s now serves %s (was %s)", self.label, model_version,
                     info.served_by.model_version)
            self.info = replace(info, served_by=replace(info.served_by,
                                                        model_version=model_version))

    def observe_trailers(self, metadata: Iterable[tuple[str, Any]] | None) -> LoadTrailers:
        """Learn the load a response's trailing metadata reports."""
        t = parse_trailers(metadata)
        if t.in_flight is not None:
            self.stats.observe_load(t.in_flight, t.queue_depth or 0, t.slots, t.queue_capacity)
        return t

    def observe_refusal(
        self, metadata: Iterable[tuple[str, Any]] | None, default_retry_after_s: float
    ) -> float | None:
        """The backend answered RESOURCE_EXHAUSTED; returns its retry hint (seconds) if any."""
        t = self.observe_trailers(metadata)
        held = None if t.in_flight is None else t.in_flight + (t.queue_depth or 0)
        self.stats.observe_refusal(t.retry_after_s, default_retry_after_s, held)
        return t.retry_after_s

    def snapshot(self) -> BackendSnapshot:
        load = self.stats.load()
        info = self.info
        return BackendSnapshot(
            name=self.address, tier=self.tier,
            node_id=info.served_by.node_id if info else "",
            healthy=self.healthy, circuit=self.breaker.state,
            in_flight=load.in_flight, queue_depth=load.queue_depth, slots=load.slots,
            capacity=load.capacity, retry_after_s=load.retry_after_s,
            ttft_ms=self.stats.ttft_ms.value, per_token_ms=self.stats.per_token_ms.value,
            completion_tokens=self.stats.completion_tokens.value,
            max_context=info.max_context if info else None,
            model_version=info.served_by.model_version if info else "",
            probe=self.stats.probe_due(),
        )


class BackendPool:
    """The backends a router may call, by address; ``add``/``remove`` work while serving."""

    def __init__(
        self, config: PoolConfig | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config or PoolConfig()
        self._clock = clock
        self._backends: dict[str, Backend] = {}
        self._changed = asyncio.Condition()

    def __len__(self) -> int:
        return len(self._backends)

    def __iter__(self) -> Any:
        return iter(list(self._backends.values()))

    def get(self, address: str) -> Backend | None:
        return self._backends.get(address)

    async def add(self, address: str) -> Backend:
        """Start tracking (and health checking) ``address``; a known address is kept as is."""
        if address in self._backends:
            return self._backends[address]
        backend = Backend(address, self.config, self._clock, on_change=self._notify)
        self._backends[address] = backend
        backend.start()
        return backend

    async def remove(self, address: str) -> None:
        """Stop routing to ``address``; calls already in flight on it finish or fail alone."""
        backend = self._backends.pop(address, None)
        if backend is not None:
            await backend.close()
            await self._notify()

    def snapshots(self) -> list[BackendSnapshot]:
        return [b.snapshot() for b in self._backends.values()]

    def ready_count(self) -> int:
        return sum(1 for b in self._backends.values() if b.healthy and b.tier is not None)

    async def wait_ready(self, timeout_s: float, min_ready: int = 1) -> bool:
        """Wait until ``min_ready`` backends are healthy with a known tier; False on timeout."""
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.ready_count() >= min_ready), timeout_s)
            except TimeoutError:
                return False
        return True

    async def close(self) -> None:
        backends, self._backends = list(self._backends.values()), {}
        await asyncio.gather(*(b.close() for b in backends), return_exceptions=True)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()
