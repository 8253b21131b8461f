"""Rolling-origin backtest of a forecaster on a rate series, and the choice of default model.

At every step after a warm-up the model forecasts ``horizon`` steps ahead from what it has seen;
it is refitted once a season (a day) on the trailing ``train_seasons`` and updated with each new
observation in between, as the autoscaler runs it. Two scores:
- MAPE of the value ``horizon`` steps ahead (points whose actual is zero left out: collection
  gaps in the data, where a percentage means nothing);
- peak-underprediction rate: of the points at or above the series' 90th percentile, the share
  forecast more than 10% too low. Those are the peaks that find too few replicas.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from autoscale.forecast import COMPLEXITY, Forecaster

PEAK_QUANTILE = 0.9
UNDER_TOLERANCE = 0.1
# A more complex model must beat a simpler one's score by this much to be the default.
COMPLEXITY_MARGIN = 0.01


@dataclass(frozen=True)
class BacktestResult:
    series: str
    model: str
    mape: float
    peak_underprediction: float
    points: int
    fit_s: float  # median seconds per fit
    predict_us: float  # median microseconds per update + predict

    @property
    def score(self) -> float:
        """What the default is chosen by: both errors weigh the same."""
        return self.mape + self.peak_underprediction


def mape(actual: np.ndarray, forecast: np.ndarray) -> float:
    """Mean absolute percentage error over the points whose actual is not zero."""
    keep = actual > 0
    return float(np.mean(np.abs(forecast[keep] - actual[keep]) / actual[keep]))


def peak_underprediction(actual: np.ndarray, forecast: np.ndarray,
                         quantile: float = PEAK_QUANTILE, tolerance: float = UNDER_TOLERANCE
                         ) -> float:
    """Share of the peak points (actual >= its ``quantile``) forecast > ``tolerance`` too low."""
    peaks = actual >= np.quantile(actual, quantile)
    return float(np.mean(forecast[peaks] < (1 - tolerance) * actual[peaks]))


def rolling_forecasts(values: np.ndarray, model: Forecaster, horizon: int, season: int,
                      warmup_seasons: int = 3, train_seasons: int = 7
                      ) -> tuple[np.ndarray, np.ndarray, list[float], list[float]]:
    """(origins, forecast paths (N, horizon), fit seconds, predict seconds) over ``values``.

    Origin ``t`` has seen ``values[:t]``; its path forecasts ``values[t : t + horizon]``.
    """
    start = max(warmup_seasons * season, model.min_history)
    if start + horizon > len(values):
        raise ValueError(f"series of {len(values)} steps is too short for a warm-up of "
                         f"{start} and a horizon of {horizon}")
    origins = np.arange(start, len(values) - horizon + 1)
    paths = np.empty((len(origins), horizon))
    fits: list[float] = []
    predicts: list[float] = []
    for i, t in enumerate(origins):
        if (t - start) % season == 0:
            began = time.perf_counter()
            model.fit(values[max(0, t - train_seasons * season):t])
            fits.append(time.perf_counter() - began)
            began = time.perf_counter()
        else:
            began = time.perf_counter()
            model.update(float(values[t - 1]))
        paths[i] = model.predict(horizon)
        predicts.append(time.perf_counter() - began)
    return origins, paths, fits, predicts


def backtest(name: str, values: np.ndarray, make: Callable[[], Forecaster], horizon: int,
             season: int, **kwargs: int) -> BacktestResult:
    """Score one model on one series (see the module docstring)."""
    model = make()
    origins, paths, fits, predicts = rolling_forecasts(values, model, horizon, season, **kwargs)
    actual, forecast = values[origins + horizon - 1], paths[:, -1]
    return BacktestResult(name, model.name, mape(actual, forecast),
                          peak_underprediction(actual, forecast), len(origins),
                          float(np.median(fits)), float(np.median(predicts)) * 1e6)


def choose_default(results: Sequence[BacktestResult]) -> str:
    """The model with the lowest mean score, unless a simpler one is within the margin."""
    scores = {m: float(np.mean([r.score for r in results if r.model == m]))
              for m in COMPLEXITY if any(r.model == m for r in results)}
    best = min(scores, key=scores.__getitem__)
    for model in COMPLEXITY:  # simplest first
        if model in scores and scores[model] <= scores[best] + COMPLEXITY_MARGIN:
            return model
    return best
