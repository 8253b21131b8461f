"""Replay a rate series through a scaling policy with a fluid queue model.

Every ``tick_s`` the policy asks for replicas (``Recommender``) from the rate now, and, for
forecast scaling, the forecast's maximum over the horizon made at the last completed step. A
new replica serves only ``provision_delay_s`` later (node, image pull and model load for a GPU
pod); removing one is immediate. The queue is a fluid: it grows by arrivals minus what the
ready replicas serve (``capacity_rps`` each) and never goes below zero. Reactive scaling here
knows the true current rate at once, the best any reactive policy can do, so the difference
measured is the forecast's alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from autoscale.backtest import rolling_forecasts
from autoscale.forecast import Forecaster
from autoscale.recommender import Recommender, ReplicaPolicy, replicas_for


@dataclass(frozen=True)
class ReplayConfig:
    tick_s: float = 60.0
    provision_delay_s: float = 600.0
    edge_share: float = 0.0


@dataclass(frozen=True)
class ReplayTrace:
    """Per tick: time, arrival rate, replicas asked for and serving, queued requests."""

    time_s: np.ndarray
    demand_rps: np.ndarray
    desired: np.ndarray
    ready: np.ndarray
    queue: np.ndarray
    tick_s: float

    def summary(self, since_s: float = 0.0) -> dict[str, float]:
        """Peak queue, minutes with a backlog, queued request-minutes, replica-hours."""
        keep = self.time_s >= since_s
        q = self.queue[keep]
        return {
            "peak_queue": float(q.max(initial=0.0)),
            "backlog_minutes": float((q > 0.5).sum() * self.tick_s / 60.0),
            "queued_request_minutes": float(q.sum() * self.tick_s / 60.0),
            "replica_hours": float(self.ready[keep].sum() * self.tick_s / 3600.0),
        }


def forecast_maxima(values: np.ndarray, model: Forecaster, horizon: int, season: int,
                    **kwargs: int) -> np.ndarray:
    """Per step j: the maximum forecast for steps j..j+horizon-1 made having seen values[:j]
    (NaN during the warm-up)."""
    out = np.full(len(values), np.nan)
    origins, paths, _, _ = rolling_forecasts(values, model, horizon, season, **kwargs)
    out[origins] = paths.max(axis=1)
    return out


def replay(values: np.ndarray, step_s: float, policy: ReplicaPolicy,
           forecasts: np.ndarray | None = None, config: ReplayConfig | None = None
           ) -> ReplayTrace:
    """Scale to ``values`` (req/s per step); ``forecasts`` None is reactive-only scaling."""
    config = config or ReplayConfig()
    recommender = Recommender(policy)
    ticks = np.arange(0.0, len(values) * step_s, config.tick_s)
    demand = values[(ticks // step_s).astype(int)]
    ready = replicas_for(float(values[0]) * (1 - config.edge_share), policy)  # start warm
    pending: list[float] = []  # times at which replicas asked for start serving
    queue = 0.0
    desired_out, ready_out, queue_out = (np.empty(len(ticks)) for _ in range(3))
    for i, now in enumerate(ticks):
        j = int(now // step_s)
        fc = None if forecasts is None or np.isnan(forecasts[j]) else float(forecasts[j])
        target = recommender.recommend(now, float(demand[i]), fc, config.edge_share).desired
        if target > ready + len(pending):
            pending += [now + config.provision_delay_s] * (target - ready - len(pending))
        while target < ready + len(pending):  # cancel what is still starting first
            if pending:
                pending.pop()
            else:
                ready -= 1
        ready += sum(1 for t in pending if t <= now)
        pending = [t for t in pending if t > now]
        served = ready * policy.capacity_rps
        queue = max(0.0, queue + (demand[i] * (1 - config.edge_share) - served) * config.tick_s)
        desired_out[i], ready_out[i], queue_out[i] = target, ready, queue
    return ReplayTrace(ticks, demand, desired_out, ready_out, queue_out, config.tick_s)
