"""How many cloud replicas a load needs: the policy, pure and clock-free.

desired = ceil(cloud-bound load x (1 + headroom) / per-replica capacity), within
[min_replicas, max_replicas], where the cloud-bound load is the larger of the rate now and its
forecast over the horizon, less the share the edge fleet absorbs. Scaling up takes effect at
once; scaling down only once every recommendation of the cool-off window agrees (as the
HorizontalPodAutoscaler's scale-down stabilization window does), so a dip between two bursts
does not drain a replica that takes minutes to bring back.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

# The cloud tier's saturation throughput on one H100 (benchmarks/RESULTS.md, "Serving").
DEFAULT_CAPACITY_RPS = 45.0


@dataclass(frozen=True)
class ReplicaPolicy:
    """Per-replica capacity, headroom, bounds and scale-down cool-off."""

    capacity_rps: float = DEFAULT_CAPACITY_RPS
    headroom: float = 0.2
    min_replicas: int = 1
    max_replicas: int = 16
    scale_down_cooloff_s: float = 600.0

    def __post_init__(self) -> None:
        if not self.capacity_rps > 0:
            raise ValueError(f"replica capacity must be > 0 req/s, got {self.capacity_rps}")
        if self.headroom < 0:
            raise ValueError(f"headroom must be >= 0, got {self.headroom}")
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 0 <= min replicas <= max replicas, got {self.min_replicas} "
                             f"and {self.max_replicas}")
        if self.scale_down_cooloff_s < 0:
            raise ValueError(f"scale-down cool-off must be >= 0 s, got "
                             f"{self.scale_down_cooloff_s}")


def cloud_load(observed_rps: float, forecast_rps: float | None, edge_share: float) -> float:
    """Requests/s the cloud must serve: the larger of now and the forecast, less the edge's."""
    demand = max(observed_rps, forecast_rps if forecast_rps is not None else 0.0)
    return max(0.0, demand) * (1.0 - min(max(edge_share, 0.0), 1.0))


def replicas_for(load_rps: float, policy: ReplicaPolicy) -> int:
    """Replicas that serve ``load_rps`` with the policy's headroom, within its bounds."""
    # The epsilon keeps 90.0000001 req/s from asking for a third replica of 45.
    need = math.ceil(load_rps * (1.0 + policy.headroom) / policy.capacity_rps - 1e-9)
    return min(policy.max_replicas, max(policy.min_replicas, need))


@dataclass(frozen=True)
class Recommendation:
    desired: int  # after the cool-off: what the HPA is told
    raw: int  # what the load alone asks for now
    cloud_load_rps: float


class Recommender:
    """``replicas_for`` plus the scale-down cool-off; ``now`` is any monotonic clock in s."""

    def __init__(self, policy: ReplicaPolicy) -> None:
        self.policy = policy
        self._recent: deque[tuple[float, int]] = deque()

    def recommend(self, now: float, observed_rps: float, forecast_rps: float | None,
                  edge_share: float) -> Recommendation:
        load = cloud_load(observed_rps, forecast_rps, edge_share)
        raw = replicas_for(load, self.policy)
        self._recent.append((now, raw))
        while self._recent and self._recent[0][0] < now - self.policy.scale_down_cooloff_s:
            self._recent.popleft()
        return Recommendation(max(r for _, r in self._recent), raw, load)
