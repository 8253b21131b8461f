"""Forecasters behind one interface, the backtest's scores, and the default model's choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoscale.backtest import (
    BacktestResult,
    backtest,
    choose_default,
    mape,
    peak_underprediction,
)
from autoscale.forecast import DEFAULT_MODEL, MODELS, SeasonalNaive, build_forecaster
from autoscale.rate_series import load_nab, load_servegen, rates_dir

SEASON = 48  # 30-minute steps: a small day keeps the LSTM's training tiny


def diurnal(days: int, season: int = SEASON, seed: int = 0, trend: float = 0.0) -> np.ndarray:
    """A daily cycle between ~50 and ~250 req/s with 3% noise."""
    t = np.arange(days * season)
    base = 150 + 100 * np.sin(2 * np.pi * t / season) + trend * t
    return base * (1 + 0.03 * np.random.default_rng(seed).standard_normal(len(t)))


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def test_seasonal_naive_repeats_the_last_season() -> None:
    model = SeasonalNaive(4)
    model.fit(np.array([9.0, 1, 2, 3, 4]))
    assert model.predict(6).tolist() == [1, 2, 3, 4, 1, 2]
    model.update(5)
    assert model.predict(2).tolist() == [2, 3]
    with pytest.raises(ValueError, match="needs 4 observations"):
        model.fit(np.ones(3))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_forecasts_a_daily_cycle(name: str) -> None:
    y = diurnal(8)
    model = build_forecaster(name, SEASON, 3)
    if name == "lstm":  # tiny: the test checks the interface and the fit, not the art
        model.train_steps = 60  # type: ignore[attr-defined]
    model.fit(y[: 6 * SEASON])
    errors = []
    for t in range(6 * SEASON, 7 * SEASON):
        errors.append(abs(model.predict(3)[-1] - y[t + 2]) / y[t + 2])
        model.update(float(y[t]))
    assert np.median(errors) < 0.15, f"{name}: median error {np.median(errors):.1%}"
    path = model.predict(5)
    assert path.shape == (5,) and (path >= 0).all()


def test_holt_winters_follows_a_level_shift_that_seasonal_naive_misses() -> None:
    y = diurnal(8)
    y[7 * SEASON:] *= 1.5  # the last day is 50% busier than every day before
    hw, naive = build_forecaster("holt-winters", SEASON, 1), SeasonalNaive(SEASON)
    for m in (hw, naive):
        m.fit(y[: 7 * SEASON + 8])
    actual = y[7 * SEASON + 8: 7 * SEASON + 20]
    hw_err = naive_err = 0.0
    for a in actual:
        hw_err += abs(hw.predict(1)[0] - a)
        naive_err += abs(naive.predict(1)[0] - a)
        hw.update(float(a))
        naive.update(float(a))
    assert hw_err < 0.6 * naive_err


def test_unknown_model_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="holt-winters"):
        build_forecaster("prophet", SEASON, 3)


def test_scores() -> None:
    actual = np.array([0.0, 100, 100, 100, 100, 100, 100, 100, 100, 1000])
    forecast = np.array([5.0, 110, 90, 100, 100, 100, 100, 100, 100, 800])
    assert mape(actual, forecast) == pytest.approx((0.1 + 0.1 + 0.2) / 9)  # the zero is left out
    assert peak_underprediction(actual, forecast) == 1.0  # the one peak, 20% short
    assert peak_underprediction(actual, actual * 0.95) == 0.0  # within the 10% tolerance


def test_backtest_scores_a_model_on_a_rolling_origin() -> None:
    y = diurnal(6)
    r = backtest("synthetic", y, lambda: SeasonalNaive(SEASON), 2, SEASON)
    assert r.model == "seasonal-naive" and r.points == 3 * SEASON - 1
    assert 0 < r.mape < 0.1 and r.fit_s >= 0


def result(model: str, mape_: float, under: float) -> BacktestResult:
    return BacktestResult("s", model, mape_, under, 10, 0.0, 0.0)


def test_the_default_is_the_best_unless_a_simpler_one_is_as_good() -> None:
    assert choose_default([result("seasonal-naive", 0.4, 0.9), result("holt-winters", 0.2, 0.5),
                           result("lstm", 0.15, 0.5)]) == "lstm"
    # LSTM ahead by less than the margin: the simpler Holt-Winters wins.
    assert choose_default([result("seasonal-naive", 0.4, 0.9), result("holt-winters", 0.2, 0.5),
                           result("lstm", 0.195, 0.5)]) == "holt-winters"
    assert DEFAULT_MODEL in MODELS


@pytest.mark.skipif(rates_dir() is None, reason="shared/data/rates is not beside the repository "
                    "(set TANDEM_RATES_DIR to run on the real series)")
def test_holt_winters_beats_the_baseline_on_real_llm_traffic() -> None:
    root = rates_dir()
    assert root is not None
    s = load_servegen(root, "m-large")
    h = s.horizon(900)
    hw = backtest(s.name, s.values, lambda: build_forecaster("holt-winters", s.season, h), h,
                  s.season)
    naive = backtest(s.name, s.values, lambda: SeasonalNaive(s.season), h, s.season)
    assert hw.mape < naive.mape and hw.peak_underprediction < naive.peak_underprediction
    taxi = load_nab(root, "nyc_taxi")
    assert taxi.step_s == 1800 and taxi.season == 48 and taxi.horizon(900) == 1
