"""Calling backends for one request: failover before the first token, relay after it.

The router always calls a backend's ``GenerateStream`` (a unary client call is folded at the
end), so time to first token is measured the same way for both. Candidates are tried in order.
A candidate failing with UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED or CANCELLED (a
broken connection reads as UNAVAILABLE) before its first chunk reaches the client is recorded
(circuit breaker, or a refusal with its retry hint) and the next one is tried within the
client's deadline. Once a chunk has gone to the client, a failure ends the stream with that
status: text is never sent twice. Every backend call carries a deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc

from core.errors import DeadlineExceeded, Overloaded, TandemError, Unavailable
from protos.tandem.v1 import inference_pb2 as pb
from router.backends import Backend

FAILOVER_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    # A backend shutting down cancels the calls it holds; the client did not ask for that.
    grpc.StatusCode.CANCELLED,
})
# Statuses that say the backend (not the request) is in trouble: they count toward its circuit.
HEALTH_FAILURES = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
})


class BackendError(TandemError):
    """A backend's own status (e.g. INVALID_ARGUMENT from an engine), passed on as it is."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None):
        super().__init__(message, retry_after_s=retry_after_s)
        self.status = code.name


@dataclass
class RelayOutcome:
    """What happened while relaying: who served, who failed first, and whether text went out."""

    backend: Backend | None = None
    failures: list[str] = field(default_factory=list)
    committed: bool = False

    def reason(self, base: str) -> str:
        """``base`` plus the failover story, when there is one."""
        if not self.failures or self.backend is None:
            return base
        b = self.backend
        return f"{base}; failover: {', '.join(self.failures)} -> {b.tier} {b.label}"


@dataclass(frozen=True)
class RelayTimeouts:
    """Deadlines of backend calls within the client's own."""

    # Longest wait for a first chunk while another candidate remains: a backend that accepted
    # the call but hangs must not eat the whole deadline.
    first_token_s: float = 30.0
    # Retry hint passed on when a backend refused without one.
    default_retry_after_s: float = 1.0


def record_error(backend: Backend, err: grpc.aio.AioRpcError, default_retry_after_s: float
                 ) -> float | None:
    """Book a failed call in the backend's breaker and stats; returns its retry hint, if any."""
    code = err.code()
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        # Busy is not broken: no circuit verdict, but stay away until its retry hint.
        backend.breaker.release()
        return backend.observe_refusal(err.trailing_metadata(), default_retry_after_s)
    backend.observe_trailers(err.trailing_metadata())
    if code in HEALTH_FAILURES:
        backend.breaker.record_failure()
    else:
        # It answered with a verdict on the request (e.g. INVALID_ARGUMENT): it is alive.
        backend.breaker.record_success()
    return None


async def relay(
    backends: Sequence[Backend],
    msg: pb.GenerateRequest,
    deadline: float,
    outcome: RelayOutcome,
    *,
    buffered: bool,
    timeouts: RelayTimeouts,
) -> AsyncIterator[pb.GenerateChunk]:
    """Yield the chunks of the first candidate that serves ``msg``.

    ``buffered`` (unary calls, cascades) holds chunks until the answer is complete, so a failure
    at any point may still fail over; otherwise chunks are relayed as they come.
    """
    refusals: list[float | None] = []  # retry hints of the candidates that refused
    for i, backend in enumerate(backends):
        time_left = deadline - time.monotonic()
        if time_left <= 0:
            break
        if not backend.breaker.try_acquire():
            outcome.failures.append(f"{backend.label} circuit open")
            continue
        more = i + 1 < len(backends)
        first_wait = min(time_left, timeouts.first_token_s) if more else time_left
        held: list[pb.GenerateChunk] = []
        verdict = False  # the breaker got a verdict (or a release) for this attempt
        backend.stats.begin()
        start = time.monotonic()
        call = backend.inference.GenerateStream(msg, timeout=time_left)
        try:
            try:
                chunk = await asyncio.wait_for(call.read(), first_wait)
            except TimeoutError:
                call.cancel()
                backend.breaker.record_failure()
                verdict = True
                outcome.failures.append(f"{backend.label} no first token in {first_wait:.1f} s")
                continue
            ttft = time.monotonic() - start
            if isinstance(chunk, pb.GenerateChunk) and chunk.HasField("served_by"):
                # A hot swap changes the node's model without a health flip: learn it here, so
                # the cache and the policy see the version that actually answers.
                backend.observe_version(chunk.served_by.model_version)
            tokens = 0
            while chunk is not grpc.aio.EOF:
                assert isinstance(chunk, pb.GenerateChunk)
                tokens += len(chunk.token_ids)
                if buffered:
                    held.append(chunk)
                else:
                    outcome.backend, outcome.committed = backend, True
                    yield chunk
                chunk = await call.read()
            if not held and not outcome.committed:
                backend.breaker.record_failure()
                verdict = True
                outcome.failures.append(f"{backend.label} ended without output")
                continue
            backend.observe_trailers(await call.trailing_metadata())
            backend.stats.observe_stream(ttft, time.monotonic() - start, tokens)
            backend.breaker.record_success()
            verdict = True
            if buffered:
                outcome.backend, outcome.committed = backend, True
                for c in held:
                    yield c
            return
        except grpc.aio.AioRpcError as e:
            hint = record_error(backend, e, timeouts.default_retry_after_s)
            verdict = True
            if outcome.committed or e.code() not in FAILOVER_CODES:
                raise BackendError(e.code(), e.details() or e.code().name, hint) from None
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                refusals.append(hint)
            outcome.failures.append(f"{backend.label} {e.code().name}")
        finally:
            backend.stats.end()
            if not verdict:
                backend.breaker.release()  # the client went away mid-call
            if not call.done():
                call.cancel()
    raise _exhausted(outcome, refusals, deadline, timeouts)


def _exhausted(
    outcome: RelayOutcome, refusals: list[float | None], deadline: float, timeouts: RelayTimeouts
) -> TandemError:
    """The error for "no candidate served": busy, out of time, or unavailable."""
    tried = "; ".join(outcome.failures) or "no candidate"
    if time.monotonic() >= deadline:
        return DeadlineExceeded(f"the deadline passed before a backend answered ({tried})")
    if refusals and len(refusals) == len(outcome.failures):
        hints = [r for r in refusals if r is not None]
        retry = min(hints) if hints else timeouts.default_retry_after_s
        return Overloaded(f"every backend tried is saturated ({tried}); retry in {retry:.1f} s",
                          retry_after_s=retry)
    return Unavailable(f"no backend could serve the request ({tried})")


async def score_on(
    backends: Sequence[Backend], request: pb.ScoreRequest, deadline: float,
    timeouts: RelayTimeouts, attempts: int = 2,
) -> tuple[pb.ScoreResponse, Backend]:
    """Score ``request`` on the first of ``backends`` that answers (failing over like generate)."""
    failures: list[str] = []
    refusals: list[float | None] = []
    for backend in list(backends)[:attempts]:
        time_left = deadline - time.monotonic()
        if time_left <= 0:
            break
        if not backend.breaker.try_acquire():
            failures.append(f"{backend.label} circuit open")
            continue
        # Not counted in stats.begin/end: a prefill is brief, and edges score beside decoding.
        verdict = False
        try:
            call = backend.inference.Score(request, timeout=time_left)
            resp = await call
            backend.observe_trailers(await call.trailing_metadata())
            backend.breaker.record_success()
            verdict = True
            return resp, backend
        except grpc.aio.AioRpcError as e:
            hint = record_error(backend, e, timeouts.default_retry_after_s)
            verdict = True
            if e.code() not in FAILOVER_CODES:
                raise BackendError(e.code(), e.details() or e.code().name, hint) from None
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                refusals.append(hint)
            failures.append(f"{backend.label} {e.code().name}")
        finally:
            if not verdict:
                backend.breaker.release()
    tried = "; ".join(failures) or "no candidate"
    if time.monotonic() >= deadline:
        raise DeadlineExceeded(f"the deadline passed before an edge node scored the prompt "
                               f"({tried})")
    if refusals and len(refusals) == len(failures):
        hints = [r for r in refusals if r is not None]
        retry = min(hints) if hints else timeouts.default_retry_after_s
        raise Overloaded(f"every edge node tried is saturated ({tried}); retry in {retry:.1f} s",
                         retry_after_s=retry)
    raise Unavailable(f"no edge node could score the prompt ({tried})")
