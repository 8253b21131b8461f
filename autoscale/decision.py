"""What one autoscaler decision holds (shared by the loop and its metrics)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    desired: int
    raw: int
    observed_rps: float
    observed_tokens_per_s: float
    forecast_rps: float | None
    forecast_tokens_per_s: float | None
    edge_share: float
    cloud_load_rps: float
    cloud_backends_up: int
