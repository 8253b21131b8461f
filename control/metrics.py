"""Prometheus metrics of the control plane: RPCs by method and status, artifact bytes served,
and the fleet read from the database when scraped.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric

from control.store import ControlStore
from core.metrics import STATUSES
from core.scrape_collectors import SafeCollector

METHODS = frozenset({
    "Enroll", "Heartbeat", "GetManifest", "FetchArtifact", "ReportOutcomes", "ListNodes",
})


class FleetCollector(SafeCollector):
    """Enrolled and live nodes, and which versions they serve (read at scrape time)."""

    def __init__(self, store: ControlStore, heartbeat_interval_s: float) -> None:
        self.store = store
        # Three missed heartbeats and a node no longer counts as live.
        self.max_age_s = 3 * heartbeat_interval_s

    def families(self) -> list[Metric]:
        return list(self._families())

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily("tandem_control_nodes", "Enrolled edge nodes"),
            GaugeMetricFamily("tandem_control_live_nodes", "Nodes healthy and heard from in "
                              "the last three heartbeat intervals"),
            GaugeMetricFamily("tandem_control_nodes_serving", "Nodes by the version they "
                              "report serving (none; other: not published here)",
                              labels=["version"]),
        )

    def _collect(self) -> Iterable[Metric]:
        nodes = self.store.nodes()
        # Nodes report any string: only published versions become label values.
        known = {v.version for v in self.store.versions()}
        now = time.time()
        enrolled, live, serving = self._families()
        enrolled.add_metric([], len(nodes))
        live.add_metric([], sum(n.is_live(now, self.max_age_s) for n in nodes))
        by_version: dict[str, int] = {}
        for n in nodes:
            label = n.served_version if n.served_version in known else (
                "other" if n.served_version else "none")
            by_version[label] = by_version.get(label, 0) + 1
        for version, count in sorted(by_version.items()):
            serving.add_metric([version], count)
        return [enrolled, live, serving]


class ControlMetrics:
    """What the control servicer and its gate record."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter("tandem_control_requests_total", "Control RPCs by method and "
                                "final gRPC status", ["method", "status"], registry=self.registry)
        self.artifact_bytes = Counter("tandem_control_artifact_bytes_total", "Artifact bytes "
                                      "streamed to nodes", registry=self.registry)

    def watch(self, store: ControlStore, heartbeat_interval_s: float) -> None:
        self.registry.register(FleetCollector(store, heartbeat_interval_s))

    def request(self, method: str, status: str) -> None:
        # Bounded label sets: an unknown method or status is folded, never a new series.
        self.requests.labels(method if method in METHODS else "other",
                             status if status in STATUSES else "UNKNOWN").inc()
