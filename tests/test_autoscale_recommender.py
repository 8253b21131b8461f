"""The replica policy: load over capacity with headroom, bounds, and the scale-down cool-off."""

from __future__ import annotations

import pytest

from autoscale.recommender import Recommender, ReplicaPolicy, cloud_load, replicas_for

POLICY = ReplicaPolicy(capacity_rps=45.0, headroom=0.2, min_replicas=2, max_replicas=10,
                       scale_down_cooloff_s=600.0)


def test_replicas_cover_the_load_with_headroom() -> None:
    assert replicas_for(100.0, POLICY) == 3  # 120 req/s over 45 per replica
    assert replicas_for(150.0, POLICY) == 4  # 180 / 45 = 4 exactly: not 5
    assert replicas_for(150.01, POLICY) == 5
    assert replicas_for(0.0, ReplicaPolicy(headroom=0.0, min_replicas=0)) == 0


def test_replicas_stay_within_bounds() -> None:
    assert replicas_for(0.0, POLICY) == 2
    assert replicas_for(10_000.0, POLICY) == 10


def test_cloud_load_is_the_larger_of_now_and_forecast_less_the_edge_share() -> None:
    assert cloud_load(100.0, 200.0, 0.25) == pytest.approx(150.0)
    assert cloud_load(300.0, 200.0, 0.0) == 300.0  # a forecast below now never scales down
    assert cloud_load(100.0, None, 0.5) == 50.0  # no forecast yet: reactive
    assert cloud_load(100.0, None, 1.7) == 0.0  # a share is clamped to [0, 1]


def test_scale_up_is_immediate_and_scale_down_waits_for_the_cool_off() -> None:
    r = Recommender(POLICY)
    assert r.recommend(0.0, 100.0, None, 0.0).desired == 3
    up = r.recommend(15.0, 100.0, 300.0, 0.0)
    assert up.desired == up.raw == 8
    # The load falls at once; the recommendation waits until the cool-off has passed.
    for t in range(30, 615, 15):
        rec = r.recommend(float(t), 100.0, None, 0.0)
        assert rec.raw == 3 and rec.desired == 8, t
    assert r.recommend(616.0, 100.0, None, 0.0).desired == 3


def test_a_new_peak_inside_the_cool_off_restarts_it() -> None:
    r = Recommender(POLICY)
    r.recommend(0.0, 400.0, None, 0.0)
    r.recommend(500.0, 400.0, None, 0.0)
    assert r.recommend(700.0, 10.0, None, 0.0).desired == 10  # 500 s is inside the window
    assert r.recommend(1101.0, 10.0, None, 0.0).desired == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"capacity_rps": 0.0}, "capacity"), ({"headroom": -0.1}, "headroom"),
    ({"min_replicas": 5, "max_replicas": 4}, "min replicas"),
    ({"scale_down_cooloff_s": -1.0}, "cool-off"),
])
def test_bad_policies_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ReplicaPolicy(**kwargs)  # type: ignore[arg-type]
