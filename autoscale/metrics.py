"""The autoscaler's exported metrics, read from its latest decision when Prometheus scrapes.

``tandem_desired_cloud_replicas`` is absent until the first decision: a restarted autoscaler
that exported a default would make the HorizontalPodAutoscaler scale a loaded tier down.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import cast

from prometheus_client.core import GaugeMetricFamily, Metric

from autoscale.decision import Decision
from autoscale.recommender import ReplicaPolicy
from core.scrape_collectors import SafeCollector

DESIRED = "tandem_desired_cloud_replicas"


def _gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


class AutoscaleCollector(SafeCollector):
    """Gauges of the latest ``Decision`` (from ``latest()``) and of the policy."""

    def __init__(self, latest: Callable[[], Decision | None], policy: ReplicaPolicy,
                 model: str, history_steps: Callable[[], int],
                 routers_scraped: Callable[[], int]) -> None:
        self.latest, self.policy, self.model = latest, policy, model
        self.history_steps, self.routers_scraped = history_steps, routers_scraped

    def families(self) -> list[Metric]:
        return [
            _gauge(DESIRED, "Cloud replicas the forecast load needs (read by the HPA)"),
            _gauge("tandem_autoscale_raw_replicas", "Replicas the load asks for now, before "
                   "the scale-down cool-off"),
            _gauge("tandem_autoscale_observed_requests_per_second", "Generation requests/s "
                   "at the routers, all tiers"),
            _gauge("tandem_autoscale_observed_tokens_per_second", "Completion tokens/s sent "
                   "by the routers"),
            _gauge("tandem_autoscale_forecast_requests_per_second", "Highest forecast "
                   "requests/s over the horizon (absent until the model is fitted)"),
            _gauge("tandem_autoscale_forecast_tokens_per_second", "Highest forecast tokens/s "
                   "over the horizon (absent until the model is fitted)"),
            _gauge("tandem_autoscale_edge_share_ratio", "Share of requests the edge and cache "
                   "absorb while the cloud has room"),
            _gauge("tandem_autoscale_cloud_load_requests_per_second", "Requests/s the cloud "
                   "is sized for: max(now, forecast) less the edge's share"),
            _gauge("tandem_autoscale_cloud_backends_up", "Healthy cloud replicas as the "
                   "routers see them"),
            _gauge("tandem_autoscale_replica_capacity_requests_per_second", "Requests/s one "
                   "cloud replica serves at saturation (configured, measured)"),
            _gauge("tandem_autoscale_max_replicas", "The policy's upper bound"),
            _gauge("tandem_autoscale_history_steps", "Steps of rate history the forecast has"),
            _gauge("tandem_autoscale_routers_scraped", "Routers whose metrics the last round "
                   "read (0: the decision is frozen)"),
            _gauge("tandem_autoscale_model_info", "The forecast model (always 1)", ("model",)),
        ]

    def _collect(self) -> Iterable[Metric]:
        (desired, raw, obs_r, obs_t, fc_r, fc_t, share, load, up, capacity, max_r, steps,
         scraped, info) = self.families()
        d = self.latest()
        values: list[tuple[Metric, float | None]] = [
            (capacity, self.policy.capacity_rps), (max_r, self.policy.max_replicas),
            (steps, self.history_steps()), (scraped, self.routers_scraped())]
        if d is not None:
            values += [(desired, d.desired), (raw, d.raw), (obs_r, d.observed_rps),
                       (obs_t, d.observed_tokens_per_s), (fc_r, d.forecast_rps),
                       (fc_t, d.forecast_tokens_per_s), (share, d.edge_share),
                       (load, d.cloud_load_rps), (up, d.cloud_backends_up)]
        for fam, value in values:
            if value is not None:
                cast(GaugeMetricFamily, fam).add_metric([], value)
                yield fam
        cast(GaugeMetricFamily, info).add_metric([self.model], 1)
        yield info


def exported_autoscale_names() -> frozenset[str]:
    """Every series the autoscaler may export (what dashboards and alerts may use)."""
    c = AutoscaleCollector(lambda: None, ReplicaPolicy(), "", lambda: 0, lambda: 0)
    return frozenset({f.name for f in c.families()} | {"tandem_autoscale_scrape_errors_total"})
