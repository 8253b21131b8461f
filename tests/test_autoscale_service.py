"""The autoscaler against real /metrics endpoints: router counters in, the desired-replicas
gauge out, in-process with a driven clock and as the `tandem autoscale run` command."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from autoscale.autoscaler import Autoscaler
from autoscale.config import AutoscaleConfig
from autoscale.history import RateHistory
from autoscale.metrics import DESIRED
from autoscale.rates import EdgeShare, RateMeter, StepAccumulator
from autoscale.recommender import ReplicaPolicy
from autoscale.scrape import RouterCounters, expand_url, parse_router_metrics
from core.metrics import MetricsEndpoint, start_metrics_server
from router.metrics import RouterMetrics

REPO = Path(__file__).resolve().parent.parent


class Pool:
    """The router's backend pool as PoolCollector reads it: one cloud replica, one edge node."""

    def __init__(self) -> None:
        self.cloud_queue = 0

    def snapshots(self) -> list[SimpleNamespace]:
        def backend(name: str, tier: str, queue: int) -> SimpleNamespace:
            return SimpleNamespace(name=name, tier=tier, node_id=name, healthy=True,
                                   circuit="closed", in_flight=0, queue_depth=queue,
                                   model_version="v1")
        return [backend("cloud-0", "cloud", self.cloud_queue), backend("edge-0", "edge", 0)]


class Router:
    """A real router metrics registry, served on a free port, whose counters the test drives."""

    def __init__(self) -> None:
        self.metrics = RouterMetrics()
        self.pool = Pool()
        self.metrics.watch(self.pool, lambda: 0)
        self.endpoint: MetricsEndpoint = start_metrics_server(self.metrics.registry,
                                                              "127.0.0.1", 0)

    def serve(self, cloud: int = 0, edge: int = 0, cache: int = 0, tokens_each: int = 10
              ) -> None:
        for tier, n in (("cloud", cloud), ("edge", edge), ("cache", cache)):
            for _ in range(n):
                self.metrics.observe_request("auto", tier, "OK", 0.1, 0.5, tokens_each)
        # Not a generation: the autoscaler must not count it.
        self.metrics.observe_request("none", "router", "OK", method="Info")


@pytest.fixture
def router() -> Iterator[Router]:
    r = Router()
    yield r
    r.endpoint.stop()


def read_gauges(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if not s.labels}


def config(url: str, **kwargs: object) -> AutoscaleConfig:
    base: dict[str, object] = dict(
        router_metrics=(url,), interval_s=10.0, step_s=10.0, season_s=40.0, horizon_s=20.0,
        model="seasonal-naive", observe_window_s=10.0, edge_share_window_s=30.0,
        policy=ReplicaPolicy(capacity_rps=4.0, headroom=0.0, min_replicas=1, max_replicas=20,
                             scale_down_cooloff_s=0.0))
    base.update(kwargs)
    return AutoscaleConfig(**base)  # type: ignore[arg-type]


def test_router_metrics_are_read_by_tier(router: Router) -> None:
    router.serve(cloud=3, edge=2, cache=1)
    router.pool.cloud_queue = 4
    with urllib.request.urlopen(router.endpoint.url, timeout=5) as response:
        c = parse_router_metrics(response.read().decode())
    assert c.requests_by_tier == {"cloud": 3.0, "edge": 2.0, "cache": 1.0}
    assert (c.requests, c.absorbed, c.tokens) == (6.0, 3.0, 60.0)
    assert (c.cloud_backends_up, c.cloud_queue_depth) == (1, 4.0)


def test_rates_come_from_differences_and_survive_a_router_restart() -> None:
    meter = RateMeter()
    a = RouterCounters({"cloud": 100.0, "edge": 50.0}, tokens=1000.0)
    assert meter.observe(0.0, {"r1": a}) is None
    b = RouterCounters({"cloud": 120.0, "edge": 70.0}, tokens=1400.0)
    c = RouterCounters({"cloud": 5.0}, tokens=50.0)  # r2 first seen: counts from its next scrape
    r = meter.observe(10.0, {"r1": b, "r2": c})
    assert r is not None and (r.requests_rps, r.absorbed, r.tokens_per_s) == (4.0, 20.0, 40.0)
    restarted = RouterCounters({"cloud": 10.0}, tokens=100.0)  # r1's counters went down
    r = meter.observe(20.0, {"r1": restarted, "r2": RouterCounters({"cloud": 15.0}, 50.0)})
    assert r is not None and r.requests == 20.0 and r.tokens == 100.0


def test_edge_share_ignores_spill_over_while_the_cloud_queues() -> None:
    meter, share = RateMeter(), EdgeShare(window_s=100.0)
    meter.observe(0.0, {"r": RouterCounters({"cloud": 0.0, "edge": 0.0})})
    r = meter.observe(10.0, {"r": RouterCounters({"cloud": 75.0, "edge": 25.0})})
    assert r is not None
    share.add(10.0, r)
    spill = meter.observe(20.0, {"r": RouterCounters({"cloud": 85.0, "edge": 115.0}, 0.0, 1, 8.0)})
    assert spill is not None and spill.cloud_saturated
    share.add(20.0, spill)
    assert share.value == pytest.approx(0.25)


def test_steps_align_to_the_clock_and_history_fills_gaps(tmp_path: Path) -> None:
    meter, steps = RateMeter(), StepAccumulator(60.0)
    meter.observe(100.0, {"r": RouterCounters({"cloud": 0.0})})
    done = []
    for t, n in ((110.0, 100.0), (130.0, 300.0), (170.0, 700.0)):
        reading = meter.observe(t, {"r": RouterCounters({"cloud": n})})
        assert reading is not None
        done += steps.add(t, reading)
    # Step 1 is [60, 120) s: closed by the first reading that ends in step 2.
    assert done == [(1, 10.0, 0.0)]
    history = RateHistory(60.0, max_steps=6, season=3)
    for index, value in ((0, 1.0), (1, 2.0), (2, 3.0), (3, 4.0)):
        assert history.append(index, value, 10 * value) == 1
    assert history.append(3, 9.0, 9.0) == 0  # seen
    assert history.append(6, 7.0, 70.0) == 3  # 4 and 5 missing: filled from a season before
    assert history.requests == [2.0, 3.0, 4.0, 2.0, 3.0, 7.0]
    path = tmp_path / "history.json"
    history.save(path)
    again = RateHistory.load(path, 60.0, 6, 3)
    assert (again.requests, again.tokens, again.last_index) == (
        history.requests, history.tokens, 6)
    assert len(RateHistory.load(path, 300.0, 6, 3)) == 0  # another step: not used
    assert history.append(20, 1.0, 1.0) == 1 and history.requests == [1.0]  # > a season: anew


def test_expand_url_names_every_address() -> None:
    urls = expand_url("http://localhost:9190/metrics")
    assert "http://127.0.0.1:9190/metrics" in urls and len(urls) == len(set(urls))


def test_the_autoscaler_publishes_desired_replicas_from_real_endpoints(
        router: Router, tmp_path: Path) -> None:
    registry = CollectorRegistry()
    history_file = tmp_path / "history.json"
    autoscaler = Autoscaler(config(router.endpoint.url, history_file=history_file), registry)
    own = start_metrics_server(registry, "127.0.0.1", 0)
    try:
        assert autoscaler.tick(1000.0) is None  # one scrape: no rate yet
        assert DESIRED not in read_gauges(own.url)  # absent, never a default the HPA acts on
        t = 1000.0
        for _ in range(8):  # 20 req/s, half from the edge, for 8 steps of 10 s
            router.serve(cloud=100, edge=100)
            t += 10.0
            d = autoscaler.tick(t)
        assert d is not None and d.forecast_rps == pytest.approx(20.0)
        gauges = read_gauges(own.url)
        assert gauges[DESIRED] == 3  # 20 req/s less the edge's half, 4 req/s per replica
        assert gauges["tandem_autoscale_observed_requests_per_second"] == pytest.approx(20.0)
        assert gauges["tandem_autoscale_observed_tokens_per_second"] == pytest.approx(200.0)
        assert gauges["tandem_autoscale_edge_share_ratio"] == pytest.approx(0.5)
        assert gauges["tandem_autoscale_forecast_requests_per_second"] == pytest.approx(20.0)
        assert gauges["tandem_autoscale_cloud_backends_up"] == 1

        # The cloud queues and the router spills everything new to the edge: the edge's
        # share holds at what it was while the cloud had room.
        router.pool.cloud_queue = 5
        router.serve(edge=400)
        t += 10.0
        d = autoscaler.tick(t)
        assert d is not None and d.edge_share == pytest.approx(0.5) and d.desired == 5

        # Routers unreachable: the last decision stands and the failure is counted.
        router.endpoint.stop()
        assert autoscaler.tick(t + 10.0) == d
        gauges = read_gauges(own.url)
        assert gauges["tandem_autoscale_scrape_errors_total"] == 1
        assert gauges["tandem_autoscale_routers_scraped"] == 0
    finally:
        own.stop()
    assert history_file.exists()
    # A restart reads the saved history and forecasts from its first decision.
    restarted = Autoscaler(config(router.endpoint.url, history_file=history_file),
                           CollectorRegistry())
    assert restarted._forecast() is not None


def test_tandem_autoscale_run_serves_the_gauge(router: Router, tmp_path: Path) -> None:
    log_path = tmp_path / "autoscale.log"
    history = tmp_path / "history.json"
    cmd = [sys.executable, "-m", "tandem.cli", "autoscale", "run",
           "--router-metrics", router.endpoint.url, "--metrics-port", "0",
           "--interval", "0.2", "--step", "1", "--season", "10", "--horizon", "1",
           "--model", "seasonal-naive", "--capacity", "10", "--headroom", "0",
           "--min-replicas", "1", "--max-replicas", "7", "--history-file", str(history)]
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_for(what: str, check: Callable[[], object]) -> object:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"autoscaler exited {proc.returncode}:\n{log_path.read_text()}")
            found = check()
            if found:
                return found
            time.sleep(0.1)
        pytest.fail(f"no {what} in 30 s:\n{log_path.read_text()}")

    def port() -> str | None:
        m = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", log_path.read_text())
        return m[1] if m else None

    try:
        url = f"http://127.0.0.1:{wait_for('metrics URL', port)}/metrics"
        wait_for("desired replicas at the minimum", lambda: read_gauges(url).get(DESIRED) == 1)
        # A burst far above 7 replicas' capacity between two scrapes: the gauge goes to max.
        router.serve(cloud=5000, tokens_each=1)
        wait_for("desired replicas at the maximum", lambda: read_gauges(url).get(DESIRED) == 7)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=10) == 0, log_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
