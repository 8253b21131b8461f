"""The router's Prometheus metrics: requests as the client sees them (families
``tandem_router_*``, so a dashboard never counts a routed request twice), cache, rate limits,
escalations, and the backend pool read at scrape time. Labels are bounded sets.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any, cast

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from core.engine_api import Engine
from core.metrics import RequestMetrics, RpcRecord, ServingMetrics
from core.scrape_collectors import ProcessCollector, SafeCollector, gauge


class RouterMetrics:
    """The router's metrics; ``RouterServicer`` calls these, ``start_router`` wires the pool."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # A private registry by default: a servicer built without metrics still has a sink.
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self.requests = RequestMetrics(reg, "tandem_router")
        self.cache_hits = Counter("tandem_router_cache_hits_total", "Answers from the cache",
                                  registry=reg)
        self.cache_misses = Counter("tandem_router_cache_misses_total", "Cacheable requests "
                                    "the cache could not answer", registry=reg)
        self.rate_limited_total = Counter(
            "tandem_router_rate_limited_total", "Requests refused by the rate limiter, by the "
            "tier of their API key", ["key_tier"], registry=reg)
        self.escalations = Counter("tandem_router_escalations_total", "Cascade answers the "
                                   "edge gave up to the cloud", registry=reg)
        self.collectors: list[Collector] = [*self.requests.collectors, self.cache_hits,
                                            self.cache_misses, self.rate_limited_total,
                                            self.escalations, ProcessCollector()]
        reg.register(self.collectors[-1])

    def watch(self, pool: Any, in_flight: Callable[[], int]) -> None:
        """Export ``pool``'s backends (read at scrape time) and the router's in-flight count."""
        collector = PoolCollector(pool, in_flight)
        self.registry.register(collector)
        self.collectors.append(collector)

    def observe_request(self, route: str, tier: str, status: str, ttft_s: float | None = None,
                        e2e_s: float | None = None, tokens: int = 0,
                        method: str = "Generate") -> None:
        """One finished request: ``tier`` served it ("edge", "cloud", "cache", "none")."""
        self.requests.observe(method, route, tier, status, ttft_s, e2e_s, tokens)

    def track(self, method: str, context: Any) -> contextlib.AbstractContextManager[RpcRecord]:
        """Count the RPC run inside with its final status; set ``route`` and call ``sent``."""
        return self.requests.track(method, context, "none")

    def cache_hit(self) -> None:
        self.cache_hits.inc()

    def cache_miss(self) -> None:
        self.cache_misses.inc()

    def rate_limited(self, key_tier: str) -> None:
        """A denial; ``key_tier`` is the key's configured tier, never the key itself."""
        self.rate_limited_total.labels(key_tier).inc()

    def escalation(self) -> None:
        self.escalations.inc()


class PoolCollector(SafeCollector):
    """The router's backends (health, circuit, load, model) and its own in-flight count."""

    def __init__(self, pool: Any, in_flight: Callable[[], int]) -> None:
        self.pool = pool  # a BackendPool, or anything with its snapshots()
        self.in_flight = in_flight

    def families(self) -> list[Metric]:
        b = ("backend", "tier", "node")
        return [
            gauge("tandem_router_in_flight_requests", "Requests this router is serving now"),
            gauge("tandem_router_backend_up", "1 if the backend passes health checks", b),
            gauge("tandem_router_backend_circuit_open", "1 while the backend's circuit "
                   "breaker is open", b),
            gauge("tandem_router_backend_in_flight_requests", "A backend's in-flight requests "
                   "as the router estimates them", b),
            gauge("tandem_router_backend_queue_depth_requests", "A backend's queued requests "
                   "as the router estimates them", b),
            gauge("tandem_router_backend_model_info", "The model a backend serves (always 1)",
                   (*b, "version")),
        ]

    def _collect(self) -> Iterable[Metric]:
        own, up, circuit, in_flight, queue, model = self.families()
        cast(GaugeMetricFamily, own).add_metric([], self.in_flight())
        # Read from the scrape thread: snapshots() builds plain values from a copied list.
        for s in self.pool.snapshots():
            labels = [s.name, s.tier or "unknown", s.node_id or s.name]
            cast(GaugeMetricFamily, up).add_metric(labels, 1 if s.healthy else 0)
            cast(GaugeMetricFamily, circuit).add_metric(labels, 1 if s.circuit == "open" else 0)
            cast(GaugeMetricFamily, in_flight).add_metric(labels, s.in_flight)
            cast(GaugeMetricFamily, queue).add_metric(labels, s.queue_depth)
            if s.model_version:
                cast(GaugeMetricFamily, model).add_metric([*labels, s.model_version], 1)
        yield from (own, up, circuit, in_flight, queue, model)


def exported_metric_names() -> frozenset[str]:
    """Every series name a Tandem server may export (what dashboards and alerts may use)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "info": ("_info",)}
    # Never scraped, so no engine is needed behind it.
    serving = ServingMetrics(CollectorRegistry(), cast(Engine, None))
    router = RouterMetrics()
    router.watch(None, lambda: 0)
    names: set[str] = set()
    for c in (*serving.collectors, *router.collectors):
        # Every collector Tandem registers describes itself (SafeCollector, the clients' own).
        for fam in c.describe():  # type: ignore[attr-defined]
            names.update(fam.name + s for s in suffixes.get(fam.type, ("",)))
    return frozenset(names)
