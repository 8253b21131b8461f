"""What each model version served on an edge node: the evidence a canary rollout judges.

Counts and a bounded sample of request latencies per version, summarised into the
``VersionOutcome`` the agent reports to the cloud (ReportOutcomes).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

# Latencies kept per version between two outcome reports: enough for a stable p99.
_LATENCY_SAMPLES = 4096


@dataclass(frozen=True)
class VersionOutcome:
    """What one model version served since the last report (the canary's evidence)."""

    model_version: str
    requests: int
    errors: int
    completion_tokens: int
    latency_p50_ms: float
    latency_p99_ms: float


@dataclass
class Tally:
    """Outcomes of one version: counts and a bounded sample of request latencies."""

    requests: int = 0
    errors: int = 0
    tokens: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=_LATENCY_SAMPLES))

    def summary(self, version: str) -> VersionOutcome:
        ordered = sorted(self.latencies_ms)

        def rank(q: float) -> float:  # nearest-rank percentile
            return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else 0.0

        return VersionOutcome(version, self.requests, self.errors, self.tokens, rank(0.5),
                              rank(0.99))
