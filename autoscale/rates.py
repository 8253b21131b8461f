"""Counters scraped from several routers -> rates now, and rates per history step.

Each router's counters are kept apart (by the URL scraped) and only differences between two
scrapes of the same router count: a router that restarts (a counter that went down) counts from
zero, as Prometheus's rate() does; one that appears counts from its second scrape.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from autoscale.scrape import ABSORBED_TIERS, RouterCounters


@dataclass(frozen=True)
class RateReading:
    """What happened between two scrapes, summed over the routers."""

    seconds: float
    requests: float
    absorbed: float  # requests the edge or the cache served
    tokens: float
    cloud_backends_up: int
    cloud_saturated: bool  # a cloud backend had a queue at the second scrape

    @property
    def requests_rps(self) -> float:
        return self.requests / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def _delta(new: float, old: float) -> float:
    return new - old if new >= old else new


class RateMeter:
    """Turns successive scrapes of every router into ``RateReading``s."""

    def __init__(self) -> None:
        self._last: dict[str, RouterCounters] = {}
        self._last_time: float | None = None

    def observe(self, now: float, scrapes: dict[str, RouterCounters]) -> RateReading | None:
        """Counters scraped at ``now`` (by source); None on the first call."""
        previous, last_time = self._last, self._last_time
        self._last, self._last_time = dict(scrapes), now
        if last_time is None or now <= last_time:
            return None
        requests = absorbed = tokens = 0.0
        for source, c in scrapes.items():
            old = previous.get(source)
            if old is None:
                continue
            for tier, value in c.requests_by_tier.items():
                d = _delta(value, old.requests_by_tier.get(tier, 0.0))
                requests += d
                absorbed += d if tier in ABSORBED_TIERS else 0.0
            tokens += _delta(c.tokens, old.tokens)
        # Several routers see the same cloud replicas: the most any router sees is the count.
        up = max((c.cloud_backends_up for c in scrapes.values()), default=0)
        saturated = any(c.cloud_queue_depth > 0 for c in scrapes.values())
        return RateReading(now - last_time, requests, absorbed, tokens, up, saturated)


class EdgeShare:
    """The share of requests the edge and cache absorbed over the last ``window_s``.

    Only while the cloud had room: when it queues, the router spills to the edge, and counting
    that spill as the edge's share would tell the autoscaler the cloud needs fewer replicas
    exactly when it needs more. While saturated the last unsaturated share holds.
    """

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._readings: deque[tuple[float, float, float]] = deque()  # (time, requests, absorbed)

    def add(self, now: float, reading: RateReading) -> None:
        if not reading.cloud_saturated:
            self._readings.append((now, reading.requests, reading.absorbed))
        while self._readings and self._readings[0][0] < now - self.window_s:
            self._readings.popleft()

    @property
    def value(self) -> float:
        """0 before anything was seen: assume the cloud takes everything (the safe side)."""
        total = sum(r for _, r, _ in self._readings)
        return sum(a for _, _, a in self._readings) / total if total > 0 else 0.0


class StepAccumulator:
    """Sums readings into steps of ``step_s`` aligned to the clock (step k covers
    [k*step_s, (k+1)*step_s)), so a restarted autoscaler's steps line up with its saved ones."""

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self._index: int | None = None
        self._requests = self._tokens = self._seconds = 0.0

    def add(self, now: float, reading: RateReading) -> list[tuple[int, float, float]]:
        """Add a reading ending at ``now``; returns the steps it completed as
        (index, requests/s, tokens/s), oldest first."""
        index = math.floor(now / self.step_s)
        done = []
        if self._index is not None and index > self._index and self._seconds > 0:
            done.append((self._index, self._requests / self._seconds,
                         self._tokens / self._seconds))
            self._requests = self._tokens = self._seconds = 0.0
        self._index = index
        # A reading that spans a boundary goes to the step it ends in: off by one scrape
        # interval at most, far below the step.
        self._requests += reading.requests
        self._tokens += reading.tokens
        self._seconds += reading.seconds
        return done
