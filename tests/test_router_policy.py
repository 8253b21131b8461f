"""The routing policy, circuit breaker and backend stats as plain objects: no servers, no grpc."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from core.errors import Overloaded, Unavailable
from router.circuit import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, CircuitConfig
from router.policy import (
    BackendSnapshot,
    PolicyConfig,
    RequestView,
    RoutingPolicy,
)
from router.stats import BackendStats, Ewma, StatsConfig

ROUTER_DIR = Path(__file__).resolve().parents[1] / "router"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def edge(name: str = "edge-1", **kw: object) -> BackendSnapshot:
    fields: dict[str, object] = dict(tier="edge", node_id=name, slots=4, max_context=512)
    return BackendSnapshot(name=f"10.0.0.1:{name}", **{**fields, **kw})  # type: ignore[arg-type]


def cloud(name: str = "cloud-1", **kw: object) -> BackendSnapshot:
    fields: dict[str, object] = dict(tier="cloud", node_id=name, slots=8, max_context=2048)
    return BackendSnapshot(name=f"10.0.0.2:{name}", **{**fields, **kw})  # type: ignore[arg-type]


def view(**kw: object) -> RequestView:
    fields: dict[str, object] = dict(prompt_bytes=40, max_tokens=64)
    return RequestView(**{**fields, **kw})  # type: ignore[arg-type]


POLICY = RoutingPolicy()


# -- the policy never imports grpc --------------------------------------------------------------

@pytest.mark.parametrize("module", ["policy.py", "circuit.py", "stats.py"])
def test_policy_modules_do_not_import_grpc(module: str) -> None:
    tree = ast.parse((ROUTER_DIR / module).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(name.split(".")[0] in ("grpc", "grpc_health") for name in imported)


# -- difficulty ----------------------------------------------------------------------------------

def test_easy_prompt_goes_to_the_edge_with_cloud_as_failover() -> None:
    d = POLICY.decide(view(), [edge(), cloud()], difficulty=2.91)
    assert d.tier == "edge"
    assert [b.node_id for b in d.candidates] == ["edge-1", "cloud-1"]
    assert d.reason == "auto: easy prompt (edge loss 2.91 <= 4.00) -> edge edge-1"
    assert d.signals["difficulty"] == 2.91 and d.signals["threshold"] == 4.0
    assert not d.cascade and not d.spilled


def test_hard_prompt_goes_to_the_cloud_with_edge_as_failover() -> None:
    d = POLICY.decide(view(), [edge(), cloud()], difficulty=5.2)
    assert d.tier == "cloud"
    assert [b.tier for b in d.candidates] == ["cloud", "edge"]
    assert d.reason == "auto: hard prompt (edge loss 5.20 > 4.00) -> cloud cloud-1"


def test_threshold_is_inclusive_and_configurable() -> None:
    assert POLICY.decide(view(), [edge(), cloud()], difficulty=4.0).tier == "edge"
    strict = RoutingPolicy(PolicyConfig(difficulty_threshold=2.5))
    assert strict.decide(view(), [edge(), cloud()], difficulty=2.91).tier == "cloud"


def test_a_calibrated_version_brings_its_own_threshold() -> None:
    # A federated version measured 4.6 on its sites' prompts: 4.3 is easy for it.
    d = POLICY.decide(view(), [edge(), cloud()], difficulty=4.3, threshold=4.6)
    assert d.tier == "edge" and d.signals["threshold"] == 4.6, d.reason
    assert POLICY.decide(view(), [edge(), cloud()], difficulty=4.3, threshold=3.9).tier == \
        "cloud"
    assert POLICY.decide(view(), [edge(), cloud()], difficulty=4.3,
                         threshold=float("nan")).tier == "cloud"  # unusable: configured 4.0
    fixed = RoutingPolicy(PolicyConfig(use_calibrated_threshold=False))
    assert fixed.decide(view(), [edge(), cloud()], difficulty=4.3, threshold=4.6).tier == \
        "cloud"


def test_unknown_difficulty_goes_to_the_cloud() -> None:
    d = POLICY.decide(view(), [edge(), cloud()], difficulty=None)
    assert d.tier == "cloud" and "difficulty unknown" in d.reason


# -- the client's hints --------------------------------------------------------------------------

@pytest.mark.parametrize("route,difficulty", [("edge", 9.0), ("cloud", 0.5)])
def test_pinned_route_wins_over_difficulty(route: str, difficulty: float) -> None:
    d = POLICY.decide(view(route=route), [edge(), cloud()], difficulty=difficulty)
    assert d.tier == route
    assert all(b.tier == route for b in d.candidates)  # never a silent switch
    assert d.reason == f"pinned: route={route} -> {route} {d.primary.node_id}"


def test_pinned_route_to_a_dead_tier_is_unavailable() -> None:
    with pytest.raises(Unavailable, match=r"route=edge .* no edge backend is healthy.*edge-1"):
        POLICY.decide(view(route="edge"), [edge(healthy=False), cloud()])
    with pytest.raises(Unavailable, match="route=cloud"):
        POLICY.decide(view(route="cloud"), [edge(), cloud(circuit=OPEN)])


def test_pinned_route_to_a_saturated_tier_is_overloaded_not_switched() -> None:
    with pytest.raises(Overloaded) as e:
        POLICY.decide(view(route="cloud"), [edge(), cloud(retry_after_s=2.5)])
    assert e.value.retry_after_s == 2.5 and "route=auto" in e.value.message


def test_quality_best_prefers_the_cloud_and_fast_the_edge() -> None:
    best = POLICY.decide(view(quality="best"), [edge(), cloud()], difficulty=1.0)
    assert best.tier == "cloud" and best.reason == "auto: quality=best -> cloud cloud-1"
    fast = POLICY.decide(view(quality="fast"), [edge(), cloud()], difficulty=8.0)
    assert fast.tier == "edge" and fast.reason == "auto: quality=fast -> edge edge-1"


def test_quality_best_spills_to_the_edge_when_the_cloud_is_full() -> None:
    d = POLICY.decide(view(quality="best"), [edge(), cloud(capacity=8, in_flight=8)])
    assert d.tier == "edge" and d.spilled
    assert d.reason == "auto: quality=best; cloud saturated, spill-over -> edge edge-1"


# -- context fit ---------------------------------------------------------------------------------

def test_prompt_that_does_not_fit_the_edge_goes_to_the_cloud() -> None:
    v = view(prompt_tokens=480, max_tokens=64, prompt_bytes=2000)
    d = POLICY.decide(v, [edge(), cloud()], difficulty=1.0)
    assert d.tier == "cloud"
    assert [b.tier for b in d.candidates] == ["cloud"]  # the edge can't be a failover either
    assert "does not fit the edge (prompt 480 tokens + 64 > 512)" in d.reason
    assert d.signals["fits_edge"] is False


def test_exact_fit_counts_prompt_tokens_plus_max_tokens() -> None:
    assert POLICY.fits(view(prompt_tokens=448, max_tokens=64), edge()) is True
    assert POLICY.fits(view(prompt_tokens=449, max_tokens=64), edge()) is False


def test_byte_length_bounds_the_fit_when_tokens_are_unknown() -> None:
    # Byte-level BPE: at most one token per byte, plus BOS.
    assert POLICY.fits(view(prompt_bytes=447, max_tokens=64), edge()) is True
    assert POLICY.fits(view(prompt_bytes=448, max_tokens=64), edge()) is None
    assert POLICY.fits(view(), edge(max_context=None)) is None
    d = POLICY.decide(view(prompt_bytes=5000, quality="fast"), [edge(), cloud()])
    assert d.tier == "cloud" and "may not fit the edge" in d.reason


def test_quality_fast_still_needs_the_prompt_to_fit() -> None:
    v = view(quality="fast", prompt_tokens=500, prompt_bytes=1500)
    assert POLICY.decide(v, [edge(), cloud()]).tier == "cloud"


def test_needs_score_only_when_the_answer_could_change() -> None:
    backends = [edge(), cloud()]
    assert POLICY.needs_score(view(), backends)
    assert not POLICY.needs_score(view(route="cloud"), backends)
    assert not POLICY.needs_score(view(route="edge"), backends)
    assert not POLICY.needs_score(view(quality="best"), backends)
    assert not POLICY.needs_score(view(quality="fast"), backends)  # surely fits, edge anyway
    assert POLICY.needs_score(view(quality="fast", prompt_bytes=5000), backends)
    assert not POLICY.needs_score(view(), [edge(healthy=False), cloud()])


# -- load and latency ----------------------------------------------------------------------------

def test_least_loaded_backend_within_the_tier() -> None:
    busy = cloud("cloud-1", slots=2, in_flight=2, queue_depth=3)
    idle = cloud("cloud-2", slots=2, in_flight=1)
    d = POLICY.decide(view(), [edge(), busy, idle], difficulty=6.0)
    assert d.primary.node_id == "cloud-2"
    assert d.signals["expected_wait_ms"]["cloud-1"] > d.signals["expected_wait_ms"]["cloud-2"]


def test_faster_backend_wins_at_equal_load() -> None:
    slow = edge("edge-1", ttft_ms=80.0, per_token_ms=40.0)
    fast = edge("edge-2", ttft_ms=20.0, per_token_ms=10.0)
    d = POLICY.decide(view(), [slow, fast, cloud()], difficulty=1.0)
    assert d.primary.node_id == "edge-2"


def test_a_backend_due_a_probe_ranks_first_whatever_its_old_estimate() -> None:
    fast = edge("edge-1", ttft_ms=10.0, per_token_ms=2.0)
    stale = edge("edge-2", ttft_ms=500.0, per_token_ms=50.0, probe=True)
    assert [b.node_id for b in POLICY.rank(view(), [fast, stale])] == ["edge-2", "edge-1"]
    d = POLICY.decide(view(), [fast, stale, cloud()], difficulty=1.0)
    assert d.primary.node_id == "edge-2"


def test_expected_wait_grows_with_the_queue() -> None:
    b = edge(slots=2, ttft_ms=100.0, per_token_ms=10.0, completion_tokens=50)
    free = POLICY.expected_wait_ms(dataclasses.replace(b, in_flight=1))
    full = POLICY.expected_wait_ms(dataclasses.replace(b, in_flight=2))
    queued = POLICY.expected_wait_ms(dataclasses.replace(b, in_flight=2, queue_depth=2))
    assert free == 100.0
    assert free < full < queued
    assert full == pytest.approx(100 + 0.5 * (100 + 10 * 50))


# -- health and circuits -------------------------------------------------------------------------

def test_unhealthy_open_and_unknown_backends_are_never_candidates() -> None:
    backends = [edge("edge-1", healthy=False), edge("edge-2", circuit=OPEN),
                BackendSnapshot(name="10.0.0.9:1", tier=None), cloud()]
    d = POLICY.decide(view(), backends, difficulty=1.0)
    assert d.tier == "cloud" and [b.node_id for b in d.candidates] == ["cloud-1"]
    assert d.reason == "auto: no edge available -> cloud cloud-1"
    assert d.signals["down"] == {"edge-1": "unhealthy", "edge-2": "circuit open",
                                 "10.0.0.9:1": "tier unknown"}


def test_half_open_backend_is_a_candidate() -> None:
    d = POLICY.decide(view(), [edge(circuit=HALF_OPEN), cloud()], difficulty=1.0)
    assert d.primary.node_id == "edge-1"


def test_no_healthy_backend_is_unavailable() -> None:
    signals: dict[str, object] = {}
    with pytest.raises(Unavailable, match=r"no healthy backend.*edge-1: unhealthy"):
        POLICY.decide(view(), [edge(healthy=False), cloud(circuit=OPEN)], signals=signals)
    assert signals["down"] == {"edge-1": "unhealthy", "cloud-1": "circuit open"}
    with pytest.raises(Unavailable):
        POLICY.decide(view(), [])


def test_max_attempts_caps_the_candidates() -> None:
    policy = RoutingPolicy(PolicyConfig(max_attempts=2))
    backends = [edge(), cloud("cloud-1"), cloud("cloud-2")]
    assert len(policy.decide(view(), backends, difficulty=1.0).candidates) == 2


# -- spill-over and overload ---------------------------------------------------------------------

def test_saturated_cloud_spills_a_hard_prompt_to_the_edge() -> None:
    full = cloud(in_flight=8, queue_depth=4, capacity=12)
    d = POLICY.decide(view(), [edge(), full], difficulty=5.5)
    assert d.tier == "edge" and d.spilled
    assert d.reason == ("auto: hard prompt (edge loss 5.50 > 4.00); cloud saturated, "
                        "spill-over -> edge edge-1")
    assert d.signals["saturated"] == {"cloud-1": "full (12/12)"}
    assert [b.tier for b in d.candidates] == ["edge"]  # the full cloud is no failover


def test_refused_cloud_counts_as_saturated_until_its_hint_expires() -> None:
    d = POLICY.decide(view(), [edge(), cloud(retry_after_s=0.8)], difficulty=5.5)
    assert d.tier == "edge" and "refused" in d.signals["saturated"]["cloud-1"]


def test_cloud_queueing_past_the_deadline_spills_to_the_edge() -> None:
    queued = cloud(slots=1, in_flight=1, queue_depth=5, ttft_ms=200.0, per_token_ms=20.0)
    assert POLICY.decide(view(), [edge(), queued], difficulty=6.0).tier == "cloud"
    d = POLICY.decide(view(time_left_s=1.0), [edge(), queued], difficulty=6.0)
    assert d.tier == "edge" and "deadline" in d.signals["saturated"]["cloud-1"]


def test_saturated_edge_hands_an_easy_prompt_to_the_cloud() -> None:
    d = POLICY.decide(view(), [edge(retry_after_s=1.0), cloud()], difficulty=1.0)
    assert d.tier == "cloud" and d.spilled and "edge saturated, spill-over" in d.reason


def test_spill_over_needs_the_prompt_to_fit_the_edge() -> None:
    v = view(prompt_tokens=500, prompt_bytes=1800)
    with pytest.raises(Overloaded):
        POLICY.decide(v, [edge(), cloud(retry_after_s=0.4)], difficulty=1.0)


def test_everything_saturated_is_overloaded_with_the_soonest_retry_hint() -> None:
    backends = [edge(retry_after_s=3.0), cloud(retry_after_s=0.7), cloud("cloud-2", capacity=1,
                                                                          in_flight=1)]
    with pytest.raises(Overloaded, match=r"saturated; retry in 0\.7 s") as e:
        POLICY.decide(view(), backends, difficulty=1.0)
    assert e.value.retry_after_s == 0.7


def test_everything_full_without_hints_uses_the_default_retry() -> None:
    policy = RoutingPolicy(PolicyConfig(default_retry_after_s=2.0))
    backends = [edge(capacity=4, in_flight=4), cloud(capacity=8, in_flight=8)]
    with pytest.raises(Overloaded) as e:
        policy.decide(view(), backends, difficulty=1.0)
    assert e.value.retry_after_s == 2.0


# -- cascade -------------------------------------------------------------------------------------

def test_cascade_sends_auto_requests_to_the_edge_first() -> None:
    policy = RoutingPolicy(PolicyConfig(cascade=True))
    d = policy.decide(view(), [edge(), cloud()], difficulty=7.0)
    assert d.cascade and d.tier == "edge"
    assert d.reason == "cascade: edge answers first -> edge edge-1"
    assert [b.tier for b in d.candidates] == ["edge", "cloud"]
    # Hints and fit still come first.
    assert not policy.decide(view(quality="best"), [edge(), cloud()]).cascade
    assert not policy.decide(view(route="edge"), [edge(), cloud()]).cascade


def test_cascade_escalates_low_confidence_answers() -> None:
    policy = RoutingPolicy(PolicyConfig(cascade_threshold=1.5))
    assert policy.escalation(2.1) == (True, "escalated (edge answer loss 2.10 > 1.50)")
    assert policy.escalation(0.9) == (False, "edge confident (answer loss 0.90 <= 1.50)")
    assert policy.escalation(None)[0] is False


def test_answer_loss_separates_the_answer_from_the_prompt() -> None:
    # Prompt: 11 tokens (10 predicted) at loss 4.0; answer: 10 tokens at loss 1.0.
    full_loss = (4.0 * 10 + 1.0 * 10) / 20
    assert RoutingPolicy.answer_loss(4.0, 11, full_loss, 21) == pytest.approx(1.0)
    assert RoutingPolicy.answer_loss(4.0, 11, 4.0, 11) is None


# -- circuit breaker -----------------------------------------------------------------------------

def test_circuit_opens_after_consecutive_failures_and_probes_after_cool_off() -> None:
    clock = FakeClock()
    cb = CircuitBreaker(CircuitConfig(failure_threshold=3, cooloff_s=5.0), clock)
    for _ in range(2):
        cb.record_failure()
    assert cb.state == CLOSED and cb.try_acquire()
    cb.record_failure()
    assert cb.state == OPEN and not cb.allows() and not cb.try_acquire()
    clock.now += 4.9
    assert cb.state == OPEN
    clock.now += 0.2
    assert cb.state == HALF_OPEN and cb.allows()
    assert cb.try_acquire()
    assert cb.state == OPEN and not cb.try_acquire()  # one probe at a time
    cb.record_success()
    assert cb.state == CLOSED and cb.consecutive_failures == 0


def test_failed_probe_reopens_for_a_full_cool_off() -> None:
    clock = FakeClock()
    cb = CircuitBreaker(CircuitConfig(failure_threshold=1, cooloff_s=2.0), clock)
    cb.record_failure()
    clock.now += 2.0
    assert cb.try_acquire()
    cb.record_failure()
    assert cb.state == OPEN
    clock.now += 1.9
    assert cb.state == OPEN
    clock.now += 0.1
    assert cb.state == HALF_OPEN


def test_success_resets_the_failure_count_and_release_frees_the_probe() -> None:
    clock = FakeClock()
    cb = CircuitBreaker(CircuitConfig(failure_threshold=2, cooloff_s=1.0), clock)
    cb.record_failure()
    cb.record_success()
    cb.record_failure()
    assert cb.state == CLOSED
    cb.record_failure()
    clock.now += 1.0
    assert cb.try_acquire()
    cb.release()  # e.g. the client cancelled: no verdict
    assert cb.state == HALF_OPEN and cb.try_acquire()


def test_circuit_config_is_checked() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitConfig(failure_threshold=0)


# -- stats ---------------------------------------------------------------------------------------

def test_ewma_starts_at_the_first_sample_and_follows_new_ones() -> None:
    e = Ewma(0.5)
    assert e.value is None
    assert e.update(100.0) == 100.0
    assert e.update(200.0) == 150.0


def test_stream_timings_feed_ttft_and_per_token_averages() -> None:
    s = BackendStats(StatsConfig(ewma_alpha=1.0))
    s.observe_stream(ttft_s=0.1, total_s=1.0, completion_tokens=10)
    assert s.ttft_ms.value == pytest.approx(100.0)
    assert s.per_token_ms.value == pytest.approx(100.0)
    assert s.completion_tokens.value == 10


def test_a_backend_not_timed_lately_is_probed_once_and_the_sample_replaces_its_averages() -> None:
    clock = FakeClock()
    s = BackendStats(StatsConfig(probe_after_s=5.0), clock)
    assert s.probe_due()  # never timed: a node just added
    s.observe_stream(ttft_s=0.5, total_s=1.0, completion_tokens=11)  # a slow moment
    clock.now += 1
    s.observe_stream(ttft_s=0.4, total_s=0.9, completion_tokens=11)
    assert not s.probe_due() and s.ttft_ms.value == pytest.approx(470.0)
    clock.now += 6  # the others kept up, so nothing more was sent its way
    assert s.probe_due()
    s.begin()
    assert not s.probe_due()  # one probe at a time
    s.observe_stream(ttft_s=0.01, total_s=0.11, completion_tokens=11)
    s.end()
    assert s.ttft_ms.value == pytest.approx(10.0) and s.per_token_ms.value == pytest.approx(10.0)
    assert not s.probe_due()


def test_load_is_the_larger_of_a_fresh_report_and_our_own_count() -> None:
    clock = FakeClock()
    s = BackendStats(StatsConfig(load_ttl_s=2.0), clock)
    s.begin()
    s.observe_load(in_flight=3, queue_depth=2, slots=4)
    load = s.load()
    assert (load.in_flight, load.queue_depth, load.slots) == (4, 1, 4)
    clock.now += 2.5  # the report went stale: only our own call is known
    assert (s.load().in_flight, s.load().queue_depth) == (1, 0)
    s.end()
    assert s.load().in_flight == 0


def test_refusal_learns_capacity_and_holds_off_for_the_hint() -> None:
    clock = FakeClock()
    s = BackendStats(clock=clock)
    s.observe_load(in_flight=2, queue_depth=1, slots=2)
    s.begin()  # the refused call
    s.observe_refusal(retry_after_s=0.5, default_retry_after_s=1.0, held=3)
    load = s.load()
    assert load.capacity == 3 and load.retry_after_s == pytest.approx(0.5)
    clock.now += 0.6
    assert s.load().retry_after_s == 0.0
    s.observe_load(in_flight=2, queue_depth=3, slots=2)  # it holds more than we thought
    assert s.load().capacity == 5


def test_refusal_without_hint_uses_the_default() -> None:
    s = BackendStats(clock=FakeClock())
    s.observe_refusal(retry_after_s=None, default_retry_after_s=1.5)
    assert s.load().retry_after_s == pytest.approx(1.5)
