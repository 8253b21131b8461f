"""Live statistics of one backend as the router sees it: latency averages and load.

Latency is measured at the router (so it includes the network round trip): an EWMA of time to
first token, of per-token time and of answer length. Load comes from two places: the load a
backend reports in trailing metadata (which counts every router's traffic, but is only as fresh
as the last response) and the router's own count of calls in flight (always exact for this
router). The estimate takes the larger of the two, trusting a report for ``load_ttl_s``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class StatsConfig:
    """How quickly averages follow new samples and how long a load report is trusted."""

    # Weight of a new sample: 0.3 follows a load change within ~5 requests, smooths single spikes.
    ewma_alpha: float = 0.3
    # Reports arrive only with responses; after this long without one, the router's own count
    # is all it knows (otherwise a backend reported full would never be tried again).
    load_ttl_s: float = 2.0
    # A backend not timed for this long gets the next request it can take, one at a time, and
    # that sample replaces its averages: otherwise an estimate from a slow moment (or the prior
    # of a newly added node) keeps it out of rotation for as long as the others keep up.
    probe_after_s: float = 5.0

    def __post_init__(self) -> None:
        if not 0.0 < self.ewma_alpha <= 1.0:
            raise ValueError(f"ewma_alpha must be in (0, 1], got {self.ewma_alpha}")
        if not self.probe_after_s > 0:
            raise ValueError(f"probe_after_s must be > 0, got {self.probe_after_s}")


class Ewma:
    """An exponentially weighted moving average; ``value`` is None until the first sample."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.value: float | None = None

    def update(self, sample: float) -> float:
        if self.value is None:
            self.value = sample
        else:
            self.value += self.alpha * (sample - self.value)
        return self.value


@dataclass(frozen=True)
class LoadEstimate:
    in_flight: int
    queue_depth: int
    slots: int | None
    # Requests the backend accepts at once (slots + queue), learned when it refused one.
    capacity: int | None
    # Seconds until the backend's last "retry after" hint expires (0: no hint pending).
    retry_after_s: float


class BackendStats:
    """Latency EWMAs and load of one backend; fed by the transport, read by the policy."""

    def __init__(
        self, config: StatsConfig | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config or StatsConfig()
        self._clock = clock
        self.ttft_ms = Ewma(self.config.ewma_alpha)
        self.per_token_ms = Ewma(self.config.ewma_alpha)
        self.completion_tokens = Ewma(self.config.ewma_alpha)
        self.local_in_flight = 0
        self._reported: tuple[int, int] | None = None  # (in_flight, queue_depth)
        self._reported_at = float("-inf")
        self.slots: int | None = None
        self.capacity: int | None = None
        self._refused_until = float("-inf")
        self._timed_at = float("-inf")  # when observe_stream last ran

    def begin(self) -> None:
        """The router sent this backend a call."""
        self.local_in_flight += 1

    def end(self) -> None:
        self.local_in_flight = max(0, self.local_in_flight - 1)

    def observe_load(
        self, in_flight: int, queue_depth: int, slots: int | None,
        queue_capacity: int | None = None,
    ) -> None:
        """A load report from the backend's trailing metadata."""
        self._reported = (max(0, in_flight), max(0, queue_depth))
        self._reported_at = self._clock()
        if slots is not None and slots > 0:
            self.slots = slots
        total = in_flight + queue_depth
        if slots is not None and queue_capacity is not None:
            # The backend told us what it holds before it refuses: no need to learn it by refusal.
            self.capacity = slots + queue_capacity
        elif self.capacity is not None and total > self.capacity:
            # It holds more than we thought it could (scaled up, or a bigger queue): learn it.
            self.capacity = total

    def observe_refusal(
        self, retry_after_s: float | None, default_retry_after_s: float, held: int | None = None
    ) -> None:
        """The backend answered RESOURCE_EXHAUSTED while holding ``held`` requests (if told)."""
        hint = retry_after_s if retry_after_s is not None else default_retry_after_s
        self._refused_until = self._clock() + max(0.0, hint)
        # What it held when it refused is what it can hold; our own count excludes the refused
        # call itself, which is still counted in local_in_flight here.
        seen = max(self.local_in_flight - 1, held or 0)
        self.capacity = max(seen, self.slots or 1, 1)

    def observe_stream(self, ttft_s: float, total_s: float, completion_tokens: int) -> None:
        """A finished generation: time to its first chunk, to its end, and tokens produced."""
        now = self._clock()
        if now - self._timed_at > self.config.probe_after_s:  # stale averages: start afresh
            for ewma in (self.ttft_ms, self.per_token_ms, self.completion_tokens):
                ewma.value = None
        self._timed_at = now
        self.ttft_ms.update(ttft_s * 1000.0)
        if completion_tokens > 1:
            self.per_token_ms.update((total_s - ttft_s) * 1000.0 / (completion_tokens - 1))
        self.completion_tokens.update(float(completion_tokens))

    def probe_due(self) -> bool:
        """Nothing of ours in flight and no generation timed for ``probe_after_s``."""
        return (self.local_in_flight == 0
                and self._clock() - self._timed_at > self.config.probe_after_s)

    def load(self) -> LoadEstimate:
        """The best current estimate: the larger of the fresh report and our own count."""
        now = self._clock()
        total = self.local_in_flight
        if self._reported is not None and now - self._reported_at <= self.config.load_ttl_s:
            total = max(total, sum(self._reported))
        in_flight = min(total, self.slots) if self.slots else total
        return LoadEstimate(
            in_flight=in_flight,
            queue_depth=total - in_flight,
            slots=self.slots,
            capacity=self.capacity,
            retry_after_s=max(0.0, self._refused_until - now),
        )
