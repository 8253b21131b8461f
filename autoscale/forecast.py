"""The forecasters' one interface, the seasonal-naive baseline, and the registry of models.

A forecaster sees a rate series sampled at a fixed step: ``fit`` estimates its parameters on a
history and leaves its state at the end of it, ``update`` adds one new observation (cheap, every
step), ``predict`` returns the next ``steps`` values. Refitting is the caller's choice (daily in
the backtest and the service), so a model's cost is paid once per refit, not once per step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol

import numpy as np


class Forecaster(Protocol):
    name: str

    @property
    def min_history(self) -> int:
        """Observations ``fit`` needs."""
        ...

    def fit(self, history: np.ndarray) -> None:
        """Estimate parameters on ``history`` (oldest first); the state ends at its last value."""
        ...

    def update(self, value: float) -> None:
        """One new observation after those seen so far."""
        ...

    def predict(self, steps: int) -> np.ndarray:
        """The next ``steps`` values (non-negative)."""
        ...


class SeasonalNaive:
    """Tomorrow repeats today: the value one season earlier. The baseline every model must beat."""

    name = "seasonal-naive"

    def __init__(self, season: int, horizon: int = 1) -> None:
        del horizon  # every horizon is read off the same season
        if season < 1:
            raise ValueError(f"season must be at least 1 step, got {season}")
        self.season = season
        self._last: deque[float] = deque(maxlen=season)

    @property
    def min_history(self) -> int:
        return self.season

    def fit(self, history: np.ndarray) -> None:
        if len(history) < self.season:
            raise ValueError(f"seasonal-naive needs {self.season} observations, got "
                             f"{len(history)}")
        self._last.clear()
        self._last.extend(float(v) for v in history[-self.season:])

    def update(self, value: float) -> None:
        self._last.append(float(value))

    def predict(self, steps: int) -> np.ndarray:
        last = np.asarray(self._last)
        # Step k ahead is the observation season - k + 1 back, wrapping for k > season.
        return np.maximum(last[np.arange(steps) % self.season], 0.0)


def _holt_winters(season: int, horizon: int) -> Forecaster:
    from autoscale.holt_winters import HoltWinters

    return HoltWinters(season, horizon)


def _lstm(season: int, horizon: int) -> Forecaster:
    # torch only when asked for: the autoscaler runs in the slim router image by default.
    from autoscale.lstm import LSTMForecaster

    return LSTMForecaster(season, horizon=horizon)


MODELS: dict[str, Callable[[int, int], Forecaster]] = {
    "seasonal-naive": SeasonalNaive,
    "holt-winters": _holt_winters,
    "lstm": _lstm,
}
# Simplest first: a model must beat the ones before it by a margin to be the default.
COMPLEXITY = ("seasonal-naive", "holt-winters", "lstm")
# The one that backtested best (benchmarks/autoscale.py; table in benchmarks/RESULTS.md).
DEFAULT_MODEL = "holt-winters"


def build_forecaster(name: str, season: int, horizon: int) -> Forecaster:
    """A fresh forecaster by name (``MODELS``): ``season`` and ``horizon`` in steps."""
    try:
        make = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown forecast model {name!r}; choose one of "
                         f"{', '.join(MODELS)}") from None
    return make(season, horizon)
