"""Prometheus metrics of every Tandem server, each on its own registry, and the /metrics port.

``ServingMetrics`` instruments a tier's ``EngineServicer`` (families ``tandem_*``);
``RequestMetrics`` is the request/latency/token family set the router's metrics reuse under
their own prefix (router/metrics.py). Load, backend health, model versions, CPU,
memory and GPU are read when Prometheus scrapes, never pushed. Labels are bounded sets (method,
route, tier, status, backend address): never prompts, request ids or API keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.registry import Collector

from core.engine_api import Chunk, Engine
from core.errors import TandemError
from core.scrape_collectors import EngineCollector, ProcessCollector

log = logging.getLogger(__name__)

# Milliseconds (a cache hit) to minutes (a long generation on a loaded edge); 0.5 s is a bound
# so the p99 > 500 ms alert reads an exact bucket.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 120.0)
ROUTES = frozenset({"auto", "edge", "cloud"})
TIERS = frozenset({"edge", "cloud", "router", "cache", "none"})
STATUSES = frozenset({
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
    "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
})


def _bounded(value: str | None, allowed: frozenset[str], other: str = "unknown") -> str:
    # A label value outside its known set would be a new series per value: fold it.
    return value if value in allowed else other


@dataclass(frozen=True)
class MetricsConfig:
    """Where a server exports /metrics: ``port`` None = nowhere, 0 = any free port."""

    port: int | None = None
    # A default port (not one the operator chose) may be held by a sibling on the same host
    # (`tandem up` runs two edge nodes): then take any free port and say so, rather than fail.
    fallback_to_free_port: bool = False

    @classmethod
    def from_flags(cls, port: int | None, default_port: int, disabled: bool) -> MetricsConfig:
        """``--metrics-port`` (None when not given) and ``--no-metrics`` as a config."""
        if disabled:
            return cls(None)
        return cls(default_port, fallback_to_free_port=True) if port is None else cls(port)


# -- requests ----------------------------------------------------------------------------------

@dataclass
class RpcRecord:
    """What one RPC learned about itself; ``track`` turns it into samples when it ends."""

    method: str
    tier: str
    route: str = "none"  # Score and Info have no route
    ttft_s: float | None = None
    e2e_s: float | None = None
    queue_s: float | None = None
    tokens: int = 0
    prompt_tokens: int = 0
    started: float = field(default_factory=time.monotonic)

    def sent(self, tokens: int, tier: str | None = None) -> None:
        """A chunk went to the client (router): the first fixes ``ttft_s``; tokens add up."""
        if self.ttft_s is None:
            self.ttft_s = time.monotonic() - self.started
        self.tokens += tokens
        if tier is not None:
            self.tier = tier

    def finished(self, last: Chunk) -> None:
        """Take timings and usage from an engine's last chunk."""
        if last.timings is not None:
            self.ttft_s = last.timings.time_to_first_token_ms / 1000.0
            self.e2e_s = last.timings.total_ms / 1000.0
            self.queue_s = last.timings.queue_ms / 1000.0
        if last.usage is not None:
            self.tokens, self.prompt_tokens = last.usage.completion_tokens, last.usage.prompt_tokens


def _status(exc: BaseException, context: Any) -> str:
    """The status an RPC ended with when its handler raised ``exc``."""
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        remaining = context.time_remaining() if context is not None else None
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    if isinstance(exc, TandemError):
        return exc.status
    code = context.code() if context is not None else None
    # context.abort() raises AbortError after setting the code; anything else is grpc's UNKNOWN.
    return getattr(code, "name", "UNKNOWN") if code is not None else "UNKNOWN"


class RequestMetrics:
    """Requests, latencies and tokens under one prefix (``tandem`` or ``tandem_router``)."""

    def __init__(self, registry: CollectorRegistry, prefix: str) -> None:
        self.requests = Counter(
            f"{prefix}_requests_total", "RPCs by method, requested route, serving tier and "
            "final gRPC status", ["method", "route", "tier", "status"], registry=registry)
        self.ttft = Histogram(
            f"{prefix}_time_to_first_token_seconds", "Time to first token of successful "
            "generations", ["route", "tier"], buckets=LATENCY_BUCKETS, registry=registry)
        self.duration = Histogram(
            f"{prefix}_request_duration_seconds", "End-to-end time of successful generations",
            ["route", "tier"], buckets=LATENCY_BUCKETS, registry=registry)
        self.generated = Counter(
            f"{prefix}_generated_tokens_total", "Completion tokens sent (rate() = tokens/s)",
            ["tier"], registry=registry)
        self.collectors: list[Collector] = [self.requests, self.ttft, self.duration,
                                            self.generated]

    def observe(self, method: str, route: str, tier: str, status: str, ttft_s: float | None,
                e2e_s: float | None, tokens: int) -> None:
        """Count one RPC and its tokens; latencies only for successful generations."""
        route, tier = _bounded(route, ROUTES | {"none"}), _bounded(tier, TIERS)
        status = _bounded(status, STATUSES, "UNKNOWN")
        self.requests.labels(method, route, tier, status).inc()
        if tokens:  # a stream cut short still sent (and cost) its tokens
            self.generated.labels(tier).inc(tokens)
        if status != "OK" or ttft_s is None:
            return  # an error's time, or a Score's, would blur the generation latencies
        self.ttft.labels(route, tier).observe(ttft_s)
        if e2e_s is not None:
            self.duration.labels(route, tier).observe(e2e_s)

    @contextlib.contextmanager
    def track(self, method: str, context: Any, tier: str) -> Iterator[RpcRecord]:
        """Count the RPC run inside with its final status (OK, aborted, cancelled or crashed)."""
        record = RpcRecord(method, tier)
        status = "OK"
        try:
            yield record
        except BaseException as e:
            status = _status(e, context)
            raise
        finally:
            if record.ttft_s is not None and record.e2e_s is None:
                record.e2e_s = time.monotonic() - record.started
            self.observe(record.method, record.route, record.tier, status, record.ttft_s,
                         record.e2e_s, record.tokens)


# -- what servers hold -------------------------------------------------------------------------

class ServingMetrics:
    """A tier's metrics (cloud or edge): requests, latencies, tokens, load, model, process."""

    def __init__(self, registry: CollectorRegistry, engine: Engine) -> None:
        self.registry = registry
        self.engine = engine
        self.requests = RequestMetrics(registry, "tandem")
        self.queue_wait = Histogram(
            "tandem_queue_wait_seconds", "Time successful generations waited for a decode slot",
            ["tier"], buckets=LATENCY_BUCKETS, registry=registry)
        self.prompt_tokens = Counter("tandem_prompt_tokens_total", "Prompt tokens prefilled",
                                     ["tier"], registry=registry)
        extra: list[Collector] = [EngineCollector(engine), ProcessCollector()]
        for c in extra:
            registry.register(c)
        self.collectors = [*self.requests.collectors, self.queue_wait, self.prompt_tokens,
                           *extra]

    @contextlib.contextmanager
    def track(self, method: str, context: Any) -> Iterator[RpcRecord]:
        """Count the RPC run inside; a generation fills the record with ``finished(chunk)``."""
        with self.requests.track(method, context, self.engine.info.served_by.tier) as record:
            yield record
            if record.queue_s is not None:
                self.queue_wait.labels(record.tier).observe(record.queue_s)
            if record.prompt_tokens:
                self.prompt_tokens.labels(record.tier).inc(record.prompt_tokens)


# -- the /metrics port -------------------------------------------------------------------------

@dataclass
class MetricsEndpoint:
    """A running /metrics HTTP server; ``stop()`` closes its socket and joins its thread."""

    port: int
    host: str
    _server: WSGIServer = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def stop(self) -> None:
        """Blocks up to half a second (the server's poll): call it via ``asyncio.to_thread``."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)


def start_metrics_server(registry: CollectorRegistry, host: str, port: int, *,
                         fallback_to_free_port: bool = False) -> MetricsEndpoint:
    """Serve ``registry`` on ``host:port`` (0 = any free port) in a daemon thread."""
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        if not fallback_to_free_port or port == 0:
            raise OSError(f"cannot serve metrics on {host}:{port}: {e.strerror}") from e
        server, thread = start_http_server(0, addr=host, registry=registry)
        log.warning("metrics port %d is taken (%s); serving metrics on port %d instead — "
                    "pass --metrics-port to choose one", port, e.strerror,
                    server.server_address[1])
    return MetricsEndpoint(int(server.server_address[1]), host, server, thread)


def serve_metrics(registry: CollectorRegistry, host: str, config: MetricsConfig
                  ) -> MetricsEndpoint | None:
    """Start the endpoint ``config`` asks for (None when metrics are off) and log its URL."""
    if config.port is None:
        return None
    endpoint = start_metrics_server(registry, host, config.port,
                                    fallback_to_free_port=config.fallback_to_free_port)
    log.info("metrics on %s", endpoint.url)
    return endpoint
