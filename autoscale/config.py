"""The autoscaler's configuration, built once by ``tandem autoscale run``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from autoscale.forecast import DEFAULT_MODEL, MODELS
from autoscale.recommender import ReplicaPolicy
from core.metrics import MetricsConfig


@dataclass(frozen=True)
class AutoscaleConfig:
    """Where the routers' metrics are, how rates are sampled and forecast, and the policy."""

    router_metrics: tuple[str, ...]
    # Scrape every address a URL's host resolves to (a headless Service of router pods).
    resolve_all: bool = False
    interval_s: float = 15.0  # scrape and decide
    step_s: float = 300.0  # one point of the forecast's history
    horizon_s: float = 900.0  # how far ahead the forecast looks: past a GPU pod's start-up
    season_s: float = 86_400.0
    train_seasons: int = 7  # history a fit sees, and all that is kept
    model: str = DEFAULT_MODEL
    # The rate "now": long enough to smooth a 15 s scrape's noise, short enough to react.
    observe_window_s: float = 60.0
    edge_share_window_s: float = 300.0
    scrape_timeout_s: float = 5.0
    history_file: Path | None = None
    policy: ReplicaPolicy = field(default_factory=ReplicaPolicy)
    host: str = "127.0.0.1"
    metrics: MetricsConfig = field(default_factory=lambda: MetricsConfig(0))

    def __post_init__(self) -> None:
        if not self.router_metrics:
            raise ValueError("give at least one --router-metrics URL")
        if self.model not in MODELS:
            raise ValueError(f"unknown forecast model {self.model!r}; choose one of "
                             f"{', '.join(MODELS)}")
        if not 0 < self.interval_s <= self.step_s:
            raise ValueError(f"need 0 < interval <= step, got {self.interval_s} s and "
                             f"{self.step_s} s")
        if self.season_s < 2 * self.step_s or self.horizon_s <= 0:
            raise ValueError("the season must span at least two steps and the horizon be > 0")

    @property
    def season(self) -> int:
        return round(self.season_s / self.step_s)

    @property
    def horizon(self) -> int:
        return max(1, math.ceil(self.horizon_s / self.step_s - 1e-9))
