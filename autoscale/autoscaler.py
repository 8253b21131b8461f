"""The autoscaler loop: scrape the routers -> rate history -> forecast -> desired replicas.

``Autoscaler.tick(now)`` is one round and takes the time from its caller (tests drive it with
their own clock); ``run_autoscaler`` calls it every interval and serves the gauges.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np
from prometheus_client import CollectorRegistry, Counter

from autoscale.config import AutoscaleConfig
from autoscale.decision import Decision
from autoscale.forecast import Forecaster, build_forecaster
from autoscale.history import RateHistory
from autoscale.metrics import AutoscaleCollector
from autoscale.rates import EdgeShare, RateMeter, RateReading, StepAccumulator
from autoscale.recommender import Recommender
from autoscale.scrape import RouterCounters, expand_url, fetch_text, parse_router_metrics
from core.metrics import serve_metrics

log = logging.getLogger(__name__)


class Autoscaler:
    """One autoscaler's state; ``tick`` runs a round, ``decision`` is the latest outcome."""

    def __init__(self, config: AutoscaleConfig, registry: CollectorRegistry,
                 fetch: Callable[[str, float], str] = fetch_text) -> None:
        self.config, self.fetch = config, fetch
        self.meter = RateMeter()
        self.edge_share = EdgeShare(config.edge_share_window_s)
        self.steps = StepAccumulator(config.step_s)
        self.history = RateHistory.load(config.history_file, config.step_s,
                                        config.train_seasons * config.season, config.season)
        self.recommender = Recommender(config.policy)
        self._recent: deque[tuple[float, RateReading]] = deque()
        self._models: tuple[Forecaster, Forecaster] | None = None
        self._fitted_at: int | None = None  # history length at the last fit
        self.decision: Decision | None = None
        # Routers that failed their last scrape: an outage is logged when it starts and when
        # it ends, not at every tick (the error counter counts every failure).
        self._failing: set[str] = set()
        self.routers_scraped = 0
        self.scrape_errors = Counter("tandem_autoscale_scrape_errors_total", "Router scrapes "
                                     "that failed", registry=registry)
        registry.register(AutoscaleCollector(lambda: self.decision, config.policy, config.model,
                                             lambda: len(self.history),
                                             lambda: self.routers_scraped))
        if len(self.history):
            log.info("rate history: %d steps from %s", len(self.history), config.history_file)
            self._refit()

    def scrape(self) -> dict[str, RouterCounters]:
        """Every router's counters that could be read now, by the URL read."""
        urls: list[str] = []
        for url in self.config.router_metrics:
            try:
                urls += expand_url(url) if self.config.resolve_all else [url]
            except OSError as e:
                self.scrape_errors.inc()
                log.warning("cannot resolve %s: %s", url, e)
        out = {}
        for url in urls:
            try:
                out[url] = parse_router_metrics(self.fetch(url, self.config.scrape_timeout_s))
            except (OSError, ValueError) as e:
                self.scrape_errors.inc()
                if url not in self._failing:
                    self._failing.add(url)
                    log.warning("cannot scrape router metrics at %s: %s (retrying every "
                                "%g s; the last decision stands)", url, e,
                                self.config.interval_s)
            else:
                if url in self._failing:
                    self._failing.discard(url)
                    log.info("router metrics at %s are back", url)
        return out

    def tick(self, now: float) -> Decision | None:
        """Scrape, update the history and forecast, and decide; None until two scrapes."""
        scrapes = self.scrape()
        self.routers_scraped = len(scrapes)
        if not scrapes:
            return self.decision  # routers unreachable: keep the last decision, never guess
        reading = self.meter.observe(now, scrapes)
        if reading is None:
            return self.decision
        self.edge_share.add(now, reading)
        self._recent.append((now, reading))
        while self._recent and self._recent[0][0] <= now - self.config.observe_window_s:
            self._recent.popleft()
        for index, requests_rps, tokens_rps in self.steps.add(now, reading):
            self._add_step(index, requests_rps, tokens_rps)
        seconds = sum(r.seconds for _, r in self._recent)
        observed = sum(r.requests for _, r in self._recent) / seconds
        observed_tokens = sum(r.tokens for _, r in self._recent) / seconds
        forecast = self._forecast()
        share = self.edge_share.value
        rec = self.recommender.recommend(now, observed, forecast[0] if forecast else None, share)
        self.decision = Decision(
            rec.desired, rec.raw, observed, observed_tokens,
            forecast[0] if forecast else None, forecast[1] if forecast else None, share,
            rec.cloud_load_rps, reading.cloud_backends_up)
        return self.decision

    def _add_step(self, index: int, requests_rps: float, tokens_rps: float) -> None:
        added = self.history.append(index, requests_rps, tokens_rps)
        if not added:
            return
        due = (self._fitted_at is None or added > 1
               or len(self.history) - self._fitted_at >= self.config.season
               or len(self.history) == self.history.max_steps)
        # A fresh fit already ends at this step; otherwise the models take it as an update.
        if not (due and self._refit()) and self._models is not None:
            self._models[0].update(requests_rps)
            self._models[1].update(tokens_rps)
        if self.config.history_file is not None:
            try:
                self.history.save(self.config.history_file)
            except OSError as e:
                log.warning("cannot save rate history to %s: %s", self.config.history_file, e)

    def _refit(self) -> bool:
        """Fit both models on the history, if it is long enough; True when fitted."""
        c = self.config
        models = (build_forecaster(c.model, c.season, c.horizon),
                  build_forecaster(c.model, c.season, c.horizon))
        if len(self.history) < models[0].min_history:
            return False
        requests, tokens = self.history.arrays()
        began = time.perf_counter()
        models[0].fit(requests)
        models[1].fit(tokens)
        self._models, self._fitted_at = models, len(self.history)
        log.info("fitted %s on %d steps in %.2f s", c.model, len(self.history),
                 time.perf_counter() - began)
        return True

    def _forecast(self) -> tuple[float, float] | None:
        """The highest forecast request and token rates over the horizon."""
        if self._models is None:
            return None
        h = self.config.horizon
        return (float(np.max(self._models[0].predict(h))),
                float(np.max(self._models[1].predict(h))))

    def save_history(self) -> None:
        if self.config.history_file is not None and len(self.history):
            self.history.save(self.config.history_file)


def run_autoscaler(config: AutoscaleConfig, stop: threading.Event) -> None:
    """Tick every ``interval_s`` and serve the gauges until ``stop`` is set."""
    registry = CollectorRegistry()
    autoscaler = Autoscaler(config, registry)
    endpoint = serve_metrics(registry, config.host, config.metrics)
    log.info("autoscaling on %s (%s, horizon %.0f s, step %.0f s); %.1f req/s per replica, "
             "%d..%d replicas", ", ".join(config.router_metrics), config.model,
             config.horizon_s, config.step_s, config.policy.capacity_rps,
             config.policy.min_replicas, config.policy.max_replicas)
    try:
        while True:
            d = autoscaler.tick(time.time())
            if d is not None:
                log.debug("desired %d (raw %d): %.1f req/s now, forecast %s, edge share %.2f",
                          d.desired, d.raw, d.observed_rps, d.forecast_rps, d.edge_share)
            if stop.wait(config.interval_s):
                break
    finally:
        autoscaler.save_history()
        if endpoint is not None:
            endpoint.stop()
