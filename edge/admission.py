"""Admission control of an edge node: bounded concurrency, a bounded FIFO line, a retry hint.

An asyncio semaphore that refuses instead of queueing without bound: at most ``slots`` holders
and ``capacity`` waiters; anyone beyond gets ``Overloaded`` at once with an estimate of when a
slot frees up, and a waiter whose deadline passes leaves the line with ``DeadlineExceeded``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from core.errors import DeadlineExceeded, Overloaded, TandemError

# Retry-after estimate before any request has finished, and the mean's window.
_DEFAULT_REQUEST_S = 1.0
_RECENT_REQUESTS = 32


class Admission:
    """At most ``slots`` holders, at most ``capacity`` FIFO waiters; anyone else is refused."""

    def __init__(self, slots: int, capacity: int) -> None:
        self.slots = slots
        self.capacity = capacity
        self.running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._recent_s: deque[float] = deque(maxlen=_RECENT_REQUESTS)
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @property
    def idle(self) -> bool:
        return self._idle.is_set()

    def retry_after_s(self) -> float:
        """When a slot should be free for a newcomer: the queue ahead x mean time / slots."""
        mean = sum(self._recent_s) / len(self._recent_s) if self._recent_s else _DEFAULT_REQUEST_S
        return min(60.0, max(0.05, (self.queued + 1) * mean / self.slots))

    async def acquire(self, deadline: float | None, who: str) -> None:
        """Take a slot, waiting in line if needed; ``Overloaded`` when the line is full."""
        if self.running < self.slots and not self._waiters:
            self.running += 1
            self._idle.clear()
            return
        if len(self._waiters) >= self.capacity:
            retry = self.retry_after_s()
            raise Overloaded(
                f"{who} is at capacity ({self.running} running, {self.queued} queued, queue "
                f"limit {self.capacity}); retry in ~{retry:.1f} s or send it to another backend",
                retry_after_s=retry,
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._idle.clear()
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            async with asyncio.timeout(remaining):
                await fut
        except BaseException as e:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(None)  # handed a slot just as we gave up: pass it on
            else:
                fut.cancel()
                if fut in self._waiters:
                    self._waiters.remove(fut)
                self._update_idle()
            if isinstance(e, TimeoutError):
                raise DeadlineExceeded(
                    "the request's deadline passed while it waited for a free slot"
                ) from None
            raise

    def release(self, duration_s: float | None) -> None:
        """Give the slot to the next waiter, or free it; ``duration_s`` feeds retry-after."""
        if duration_s is not None:
            self._recent_s.append(duration_s)
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot moves to the waiter: running stays the same
                return
        self.running -= 1
        self._update_idle()

    def refuse_waiters(self, err: TandemError) -> None:
        """Fail everyone still in line (shutdown after the grace period)."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(err)
        self._update_idle()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def _update_idle(self) -> None:
        if self.running == 0 and not self._waiters:
            self._idle.set()
