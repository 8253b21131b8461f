"""Holt-Winters exponential smoothing (damped trend, seasonal) in numpy.

Fitted on log1p of the rate: traffic's daily swing grows with its level (multiplicative
seasonality), which is additive in log space, and the forecast can never go negative. The
smoothing weights are chosen from a small grid by the absolute error of the h-step forecast on
the history (the horizon the autoscaler acts on, not one step), every candidate run at once as
numpy vectors. Reference: Hyndman & Athanasopoulos, "Forecasting: Principles and Practice",
3rd ed., section 8.3.
"""

from __future__ import annotations

import itertools

import numpy as np

ALPHAS = (0.05, 0.1, 0.2, 0.4, 0.7)  # level
BETAS = (0.0, 0.01, 0.05)  # trend
GAMMAS = (0.05, 0.15, 0.3)  # season
# A damped trend: a ramp seen this hour is not extrapolated for a day.
PHI = 0.95


class HoltWinters:
    """Additive Holt-Winters with a damped trend on log1p(rate); weights fitted on a grid."""

    name = "holt-winters"

    def __init__(self, season: int, horizon: int = 3, phi: float = PHI) -> None:
        if season < 2:
            raise ValueError(f"holt-winters needs a season of at least 2 steps, got {season}")
        # The fit scores the forecast this many steps ahead (15 min at a 5-minute step).
        self.season, self.horizon, self.phi = season, max(1, horizon), phi
        self.alpha = self.beta = self.gamma = 0.0
        self._level = self._trend = 0.0
        self._seasonal = np.zeros(season)
        self._next = 0  # season index of the next observation

    @property
    def min_history(self) -> int:
        return 2 * self.season  # one season to initialise, one to fit the weights on

    def fit(self, history: np.ndarray) -> None:
        m = self.season
        if len(history) < self.min_history:
            raise ValueError(f"holt-winters needs {self.min_history} observations, got "
                             f"{len(history)}")
        x = np.log1p(np.maximum(np.asarray(history, dtype=float), 0.0))
        grid = np.array(list(itertools.product(ALPHAS, BETAS, GAMMAS)))  # (K, 3)
        a, b, g = grid[:, 0], grid[:, 1], grid[:, 2]
        k = len(grid)
        level = np.full(k, x[:m].mean())
        trend = np.zeros(k)
        seasonal = np.tile(x[:m] - x[:m].mean(), (k, 1))  # (K, m)
        h = min(self.horizon, len(x) - m - 1)
        damp = float(sum(self.phi ** j for j in range(1, h + 1)))
        y = np.expm1(x)
        loss = np.zeros(k)
        for t in range(m, len(x)):
            level, trend = self._step(x[t], t % m, level, trend, seasonal, a, b, g)
            if t + h < len(x):
                f = level + damp * trend + seasonal[:, (t + h) % m]
                loss += np.abs(np.expm1(np.minimum(f, 50.0)) - y[t + h])
        best = int(np.argmin(loss))
        self.alpha, self.beta, self.gamma = (float(v) for v in grid[best])
        self._level, self._trend = float(level[best]), float(trend[best])
        self._seasonal = seasonal[best].copy()
        self._next = len(x) % m

    def _step(self, xt: float, i: int, level: np.ndarray, trend: np.ndarray,
              seasonal: np.ndarray, a: np.ndarray, b: np.ndarray, g: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
        """One observation for every candidate; updates ``seasonal`` in place."""
        s = seasonal[:, i]
        new_level = a * (xt - s) + (1 - a) * (level + self.phi * trend)
        trend = b * (new_level - level) + (1 - b) * self.phi * trend
        seasonal[:, i] = g * (xt - new_level) + (1 - g) * s
        return new_level, trend

    def update(self, value: float) -> None:
        seasonal = self._seasonal[None, :]
        level, trend = self._step(
            float(np.log1p(max(value, 0.0))), self._next, np.array([self._level]),
            np.array([self._trend]), seasonal, np.array([self.alpha]), np.array([self.beta]),
            np.array([self.gamma]))
        self._level, self._trend = float(level[0]), float(trend[0])
        self._next = (self._next + 1) % self.season

    def predict(self, steps: int) -> np.ndarray:
        k = np.arange(1, steps + 1)
        damp = np.cumsum(self.phi ** k)
        f = self._level + damp * self._trend + self._seasonal[(self._next + k - 1) % self.season]
        return np.maximum(np.expm1(np.minimum(f, 50.0)), 0.0)
