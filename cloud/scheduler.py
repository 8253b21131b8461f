"""Who runs next: slots, the waiting queue and admission control of continuous batching.

Plain Python, no torch: the engine asks ``admit`` between decode steps which waiting sequences
take free KV-cache slots, and ``release`` when a sequence leaves. The queue is bounded; over it
``submit`` refuses at once with a retry-after estimate instead of letting work wait forever
(text-generation-inference and vLLM: only the scheduler decides who joins a batch).
"""

from __future__ import annotations

import heapq
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from core.errors import Overloaded, Unavailable

T = TypeVar("T")


@dataclass(frozen=True)
class SchedulerConfig:
    slots: int = 8
    max_queue: int = 64
    # Prompt tokens admitted, and prefilled, per step: bounds how long one step can stall
    # running decodes. A longer prompt is prefilled in chunks of this size over several steps.
    max_prefill_tokens: int = 2048


class Scheduler(Generic[T]):
    """Thread-safe: ``submit`` runs on the event loop, everything else in the engine thread."""

    def __init__(self, config: SchedulerConfig, cost: Callable[[T], int]) -> None:
        self.config = config
        self._cost = cost
        self._lock = threading.Lock()
        self._waiting: deque[T] = deque()
        # A heap: the lowest free slot goes first, so running sequences stay packed in slots
        # 0..n-1 and the decode step's batch bucket (rows 0..bucket-1) stays small.
        self._free = list(range(config.slots))
        self._running: dict[int, T] = {}
        self._closed = False
        # Seconds one sequence holds a slot, moving average; feeds the retry-after hint.
        self._mean_service_s = 1.0
        self.wakeup = threading.Event()

    # ---- event-loop side ----------------------------------------------------------------

    def submit(self, item: T) -> None:
        with self._lock:
            if self._closed:
                raise Unavailable("server is draining; retry on another replica")
            if len(self._waiting) >= self.config.max_queue:
                raise Overloaded(
                    f"queue full ({self.config.max_queue} waiting, {self.config.slots} running); "
                    "retry later",
                    retry_after_s=self.retry_after_s(),
                )
            self._waiting.append(item)
        self.wakeup.set()

    def retry_after_s(self) -> float:
        """Expected wait for a slot if one joined the queue now."""
        waves = len(self._waiting) / max(1, self.config.slots) + 1
        return round(waves * self._mean_service_s, 3)

    def close(self) -> None:
        """Refuse new work from now on (draining)."""
        with self._lock:
            self._closed = True

    # ---- engine-thread side -------------------------------------------------------------

    def admit(self) -> list[tuple[int, T]]:
        """Move waiting items into free slots, within the per-step prefill budget."""
        admitted: list[tuple[int, T]] = []
        budget = self.config.max_prefill_tokens
        with self._lock:
            while self._waiting and self._free:
                cost = self._cost(self._waiting[0])
                # Always admit one, even over budget, or a long prompt would starve.
                if admitted and cost > budget:
                    break
                item = self._waiting.popleft()
                slot = heapq.heappop(self._free)
                self._running[slot] = item
                admitted.append((slot, item))
                budget -= cost
        return admitted

    def release(self, slot: int, service_s: float | None = None) -> None:
        with self._lock:
            if self._running.pop(slot, None) is not None:
                heapq.heappush(self._free, slot)
            if service_s is not None:
                self._mean_service_s = 0.9 * self._mean_service_s + 0.1 * service_s

    def drop_waiting(self, keep: Callable[[T], bool]) -> list[T]:
        """Remove waiting items for which ``keep`` is false (cancelled, expired)."""
        with self._lock:
            dropped = [item for item in self._waiting if not keep(item)]
            if dropped:
                self._waiting = deque(item for item in self._waiting if keep(item))
        return dropped

    @property
    def running(self) -> dict[int, T]:
        return self._running

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def idle(self) -> bool:
        return not self._waiting and not self._running
