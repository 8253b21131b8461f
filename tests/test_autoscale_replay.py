"""Replaying a rate series: forecast scaling raises replicas before a peak arrives."""

from __future__ import annotations

import numpy as np
import pytest

from autoscale.forecast import build_forecaster
from autoscale.rate_series import load_servegen, rates_dir
from autoscale.recommender import ReplicaPolicy, replicas_for
from autoscale.replay import ReplayConfig, forecast_maxima, replay

STEP_S = 300.0
SEASON = 288  # a day of 5-minute steps
HORIZON = 3  # 15 minutes
POLICY = ReplicaPolicy(capacity_rps=45.0, headroom=0.2, max_replicas=32)
CONFIG = ReplayConfig(tick_s=60.0, provision_delay_s=600.0)


def morning_rush(days: int = 4, seed: int = 1) -> np.ndarray:
    """100 req/s at night; at 08:00 the rate climbs to 350 req/s within 15 minutes, holds until
    18:00 and falls back. 2% noise: the same every day, as traffic of a working week is."""
    hour = (np.arange(days * SEASON) % SEASON) * STEP_S / 3600
    rate = np.where((hour >= 8) & (hour < 18), 350.0, 100.0)
    rate[(hour >= 8) & (hour < 8.25)] = [175.0, 262.5, 350.0] * days  # the 15-minute climb
    return rate * (1 + 0.02 * np.random.default_rng(seed).standard_normal(len(rate)))


def first(mask: np.ndarray) -> int:
    assert mask.any()
    return int(np.argmax(mask))


@pytest.mark.parametrize("model", ["seasonal-naive", "holt-winters"])
def test_replicas_rise_before_the_morning_peak(model: str) -> None:
    rates = morning_rush()
    forecasts = forecast_maxima(rates, build_forecaster(model, SEASON, HORIZON), HORIZON,
                                SEASON)
    predictive = replay(rates, STEP_S, POLICY, forecasts, CONFIG)
    reactive = replay(rates, STEP_S, POLICY, None, CONFIG)
    last_day = predictive.time_s >= 3 * 86_400  # days 0-2 are the forecast's warm-up
    night = replicas_for(130.0, POLICY)  # above the night's level with its noise
    rush = 3 * 86_400 + 8 * 3600.0  # the climb starts
    peak_need = replicas_for(350.0 * 1.02, POLICY)

    up_forecast = first(last_day & (predictive.desired > night))
    up_reactive = first(last_day & (reactive.desired > night))
    assert predictive.time_s[up_forecast] < rush <= reactive.time_s[up_reactive]
    # Asked for early enough, the replicas serve when the peak arrives (the climb's top).
    at_peak = first(predictive.time_s >= rush + 2 * STEP_S)
    assert predictive.ready[at_peak] >= peak_need > reactive.ready[at_peak]
    today = predictive.summary(3 * 86_400)
    reactive_today = reactive.summary(3 * 86_400)
    assert today["peak_queue"] < 0.2 * reactive_today["peak_queue"]
    assert reactive_today["backlog_minutes"] > today["backlog_minutes"]


def test_reactive_scaling_alone_lags_by_the_provisioning_delay() -> None:
    rates = np.array([100.0] * 12 + [350.0] * 12)
    trace = replay(rates, STEP_S, POLICY, None, CONFIG)
    jump = 12 * STEP_S
    asked = first(trace.time_s >= jump)
    assert trace.desired[asked] == replicas_for(350.0, POLICY)
    assert trace.ready[asked] == replicas_for(100.0, POLICY)
    served = first(trace.ready >= replicas_for(350.0, POLICY))
    assert trace.time_s[served] == jump + CONFIG.provision_delay_s
    assert trace.queue[served - 1] > 0 and trace.queue[-1] == 0


@pytest.mark.skipif(rates_dir() is None, reason="shared/data/rates is not beside the repository "
                    "(set TANDEM_RATES_DIR to replay a real series)")
def test_forecast_scaling_queues_less_on_real_llm_traffic() -> None:
    root = rates_dir()
    assert root is not None
    s = load_servegen(root, "m-large")
    h = s.horizon(900)
    forecasts = forecast_maxima(s.values, build_forecaster("holt-winters", s.season, h), h,
                                s.season)
    since = float(np.argmax(~np.isnan(forecasts)) * s.step_s)
    predictive = replay(s.values, s.step_s, POLICY, forecasts, CONFIG).summary(since)
    reactive = replay(s.values, s.step_s, POLICY, None, CONFIG).summary(since)
    assert predictive["backlog_minutes"] < reactive["backlog_minutes"]
    assert predictive["queued_request_minutes"] < reactive["queued_request_minutes"]
