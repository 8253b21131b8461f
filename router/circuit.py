"""A circuit breaker per backend: stop calling a backend that keeps failing, probe it later.

closed -> (``failure_threshold`` consecutive failures) -> open -> (``cooloff_s``) -> half-open,
which lets exactly one probe through: its success closes the circuit, its failure reopens it.
The clock is injectable so tests step time instead of sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


@dataclass(frozen=True)
class CircuitConfig:
    """When a backend's circuit opens and how long it rests before a probe."""

    failure_threshold: int = 3
    cooloff_s: float = 5.0

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {self.failure_threshold}")
        if self.cooloff_s < 0:
            raise ValueError(f"cooloff_s must be >= 0, got {self.cooloff_s}")


class CircuitBreaker:
    """Counts consecutive failures of one backend and says whether it may be called now."""

    def __init__(
        self, config: CircuitConfig | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config or CircuitConfig()
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        # Half-open lets one request through; others wait for its verdict.
        self._probing = False

    @property
    def state(self) -> str:
        """``closed``, ``open``, or ``half_open`` (a probe may be sent right now)."""
        if self._opened_at is None:
            return CLOSED
        if self._probing or self._clock() - self._opened_at < self.config.cooloff_s:
            return OPEN
        return HALF_OPEN

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def allows(self) -> bool:
        """Would a call be let through now? (No side effects; see ``try_acquire``.)"""
        return self.state != OPEN

    def try_acquire(self) -> bool:
        """Claim the right to call: always when closed, once per cool-off when half-open."""
        state = self.state
        if state == OPEN:
            return False
        if state == HALF_OPEN:
            self._probing = True
        return True

    def record_success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def record_failure(self) -> None:
        self._failures += 1
        if self._probing:
            # The probe failed: rest for another full cool-off.
            self._opened_at = self._clock()
            self._probing = False
        elif self._opened_at is None and self._failures >= self.config.failure_threshold:
            self._opened_at = self._clock()

    def release(self) -> None:
        """An acquired call ended without a verdict (e.g. the client cancelled)."""
        self._probing = False
