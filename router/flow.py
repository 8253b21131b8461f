"""The router's request flow as a plain object: admit -> cache -> score -> decide -> relay.

``RequestFlow.generate`` takes a validated ``GenerationRequest`` (with the caller's key and
deadline) and yields ``RoutedChunk``s: the engine's chunks plus who served them and why. It
rate-limits and caches through the front door, asks the policy (with an edge Score of the prompt
when the difficulty matters), relays with failover, hands cascades to ``router.cascade``, and
writes one DEBUG line per request saying what decided. ``score`` forwards a client's Score to an
edge node; ``info`` describes the router.

This file imports no grpc and knows no status code or servicer context: failures are the
TandemErrors of ``core.errors``, which the servicer maps to a status. Protobuf appears only where
the relay and the front door still speak it: ``BackendCalls`` and the two chunk conversions
below, with ``core.convert`` doing the field work.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from core import convert
from core.engine_api import Chunk, EngineInfo, ScoreResult, ServedBy
from core.errors import InvalidRequest, TandemError, Unavailable
from core.request import GenerationRequest
from protos.tandem.v1 import inference_pb2 as pb
from router.backends import Backend, BackendPool
from router.cache import cacheable
from router.cascade import Cascade
from router.config import RouterConfig
from router.frontdoor import FrontDoor, cache_versions, replay
from router.keys import KeyRecord
from router.metrics import RouterMetrics
from router.policy import CLOUD, BackendSnapshot, Decision, RequestView, RoutingPolicy
from router.relay import RelayOutcome, RelayTimeouts, relay, score_on

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoutedChunk:
    """A chunk of an answer on its way to the client, with who served it and why."""

    chunk: Chunk
    served_by: ServedBy  # the backend (or cached answer) this chunk came from
    request_id: str
    # Says who served it and why on the wire (a stream's first and last chunk).
    labelled: bool = False
    route_reason: str = ""
    cached: bool = False


@dataclass(frozen=True)
class PromptScore:
    """An edge node's Score of a prompt, and who scored it (None when its answer did not say)."""

    result: ScoreResult
    served_by: ServedBy | None = None


def routed_to_proto(c: RoutedChunk) -> pb.GenerateChunk:
    """The client's message for a chunk (served_by and route_reason where it is labelled)."""
    return convert.chunk_to_proto(c.chunk, served_by=c.served_by, request_id=c.request_id,
                                  first=c.labelled, route_reason=c.route_reason, cached=c.cached)


async def plain_chunks(
    msgs: AsyncIterator[pb.GenerateChunk], unnamed: Callable[[], ServedBy]
) -> AsyncIterator[RoutedChunk]:
    """Each message as a ``RoutedChunk``; ``unnamed()`` says who served until a chunk does."""
    served: ServedBy | None = None
    async for msg in msgs:
        labelled = msg.HasField("served_by")
        if labelled:
            served = convert.served_by_from_proto(msg.served_by)
        elif served is None:
            served = unnamed()
        yield RoutedChunk(convert.chunk_from_proto(msg), served, msg.request_id, labelled,
                          msg.route_reason, msg.cached)


def _server_of(backend: Backend | None) -> ServedBy:
    # Tandem backends name themselves on their first chunk; this is for one that would not.
    # relay sets outcome.backend before it yields, and only backends with an Info are candidates.
    assert backend is not None and backend.info is not None
    return backend.info.served_by


class BackendCalls:
    """The pool's backends called with plain requests, answering plain chunks and scores."""

    def __init__(self, pool: BackendPool, timeouts: RelayTimeouts) -> None:
        self.pool = pool
        self.timeouts = timeouts

    def resolve(self, snapshots: Sequence[BackendSnapshot]) -> list[Backend]:
        found = (self.pool.get(s.name) for s in snapshots)
        return [b for b in found if b is not None]  # one may have been removed meanwhile

    def generate(
        self, backends: Sequence[Backend], req: GenerationRequest, deadline: float,
        outcome: RelayOutcome, *, buffered: bool,
    ) -> AsyncIterator[RoutedChunk]:
        """``relay`` (failover, buffering: see router.relay) of ``req`` to ``backends``."""
        msgs = relay(backends, convert.request_to_proto(req), deadline, outcome,
                     buffered=buffered, timeouts=self.timeouts)
        return plain_chunks(msgs, lambda: _server_of(outcome.backend))

    async def score(
        self, backends: Sequence[Backend], prompt: str, deadline: float, attempts: int = 2,
    ) -> tuple[PromptScore, Backend]:
        """``prompt`` scored by the first of ``backends`` that answers (see ``score_on``)."""
        resp, backend = await score_on(backends, prompt, deadline, self.timeouts, attempts)
        threshold = (resp.difficulty_threshold if resp.HasField("difficulty_threshold")
                     else None)
        served_by = (convert.served_by_from_proto(resp.served_by) if resp.HasField("served_by")
                     else None)
        return PromptScore(ScoreResult(resp.mean_loss, resp.prompt_tokens, threshold),
                           served_by), backend


class RequestFlow:
    """One router's requests over its backend pool: plain requests in, plain chunks out."""

    def __init__(self, pool: BackendPool, policy: RoutingPolicy, config: RouterConfig,
                 metrics: RouterMetrics, front: FrontDoor) -> None:
        self.pool = pool
        self.policy = policy
        self.config = config
        self.metrics = metrics
        self.front = front  # keys, limits and the cache
        self.calls = BackendCalls(pool, RelayTimeouts(config.first_token_timeout_s,
                                                      config.policy.default_retry_after_s))
        self.cascade = Cascade(self.calls, policy, config, metrics)

    def info(self) -> EngineInfo:
        """The router itself (tier router), describing the largest model behind it."""
        infos = sorted((b.info for b in self.pool if b.info is not None),
                       key=lambda i: (i.served_by.tier != CLOUD, -i.max_context))
        main = infos[0] if infos else None
        return EngineInfo(
            served_by=ServedBy("router", self.config.node_id,
                               main.served_by.model_version if main else ""),
            model_name=main.model_name if main else "",
            max_context=max((i.max_context for i in infos), default=0),
            max_new_tokens=min(self.config.limits.max_new_tokens,
                               max((i.max_new_tokens for i in infos), default=0)),
            precision=",".join(sorted({i.precision for i in infos})),
        )

    async def score(self, prompt: str, deadline: float) -> PromptScore:
        """A client's Score: forwarded to an edge node, since difficulty is the edge's loss."""
        if not prompt.strip():
            raise InvalidRequest("prompt must be non-empty UTF-8 text")
        limit = self.config.limits.max_prompt_bytes
        if len(prompt.encode()) > limit:
            raise InvalidRequest(f"prompt is over the limit of {limit} bytes")
        scorers = self.calls.resolve(self.policy.scorers(self.pool.snapshots()))
        if not scorers:
            raise Unavailable("no healthy edge node to score the prompt; retry later")
        scored, _ = await self.calls.score(scorers, prompt, deadline,
                                           self.config.policy.max_attempts)
        return scored

    async def generate(
        self, req: GenerationRequest, key: KeyRecord | None, deadline: float, *, buffered: bool
    ) -> AsyncIterator[RoutedChunk]:
        """Rate-limit, answer from the cache or route (logging what decided), remember.

        ``buffered`` (unary calls) holds each backend's answer until it is whole, so a backend
        failing at any point may still fail over.
        """
        started = time.monotonic()
        record: dict[str, Any] = {"id": req.request_id}
        try:
            try:
                await self.front.admit(req, key)
            except TandemError:
                self.metrics.rate_limited(key.tier if key else "anonymous")
                raise
            if cacheable(req) and self.front.config.cache.enabled:
                versions = cache_versions(self.pool.snapshots(), req.route)
                hit = await self.front.lookup(req, versions)
                if hit is not None:
                    self.metrics.cache_hit()
                    record["reason"] = "cache hit"
                    served_by = hit.served_by
                    async for chunk in plain_chunks(replay(hit, req, started), lambda: served_by):
                        yield chunk
                    return
                self.metrics.cache_miss()
            answer: list[RoutedChunk] = []
            async for chunk in self._route(req, deadline, buffered, record):
                if cacheable(req):
                    answer.append(chunk)
                yield chunk
            await self.front.store(req, [routed_to_proto(c) for c in answer])
        except TandemError as e:
            record["error"] = f"{e.status}: {e.message}"
            raise
        finally:
            if log.isEnabledFor(logging.DEBUG):
                record["ms"] = round((time.monotonic() - started) * 1000, 1)
                log.debug("route %s", json.dumps(record, default=str))

    async def _route(
        self, req: GenerationRequest, deadline: float, buffered: bool, record: dict[str, Any]
    ) -> AsyncIterator[RoutedChunk]:
        """Decide, then relay (or cascade); the signals that decided go into ``record``."""
        decision, score = await self._decide(req, deadline, record)
        record["reason"] = decision.reason
        if decision.cascade:
            async for chunk in self.cascade.answer(req, decision, score, deadline, buffered,
                                                   record):
                yield chunk
            return
        outcome = RelayOutcome()
        async for chunk in self.calls.generate(self.calls.resolve(decision.candidates), req,
                                               deadline, outcome, buffered=buffered):
            if chunk.labelled:
                record["reason"] = reason = outcome.reason(decision.reason)
                chunk = replace(chunk, route_reason=reason)
            yield chunk
        record["served_by"] = outcome.backend.label if outcome.backend else None

    async def _decide(
        self, req: GenerationRequest, deadline: float, record: dict[str, Any]
    ) -> tuple[Decision, PromptScore | None]:
        """Score the prompt if the policy needs it, then ask the policy (signals into record)."""
        snaps = self.pool.snapshots()
        view = RequestView(
            route=req.route, quality=req.quality, max_tokens=req.max_tokens,
            prompt_bytes=len(req.prompt.encode("utf-8", errors="surrogatepass")),
            time_left_s=deadline - time.monotonic(),
        )
        score: PromptScore | None = None
        note = "not needed"
        if self.policy.needs_score(view, snaps):
            score, note = await self._score_prompt(req.prompt, snaps, deadline)
            if score is not None:
                view = replace(view, prompt_tokens=score.result.prompt_tokens,
                               time_left_s=deadline - time.monotonic())
            snaps = self.pool.snapshots()  # a failed score may have opened a circuit
        record["score"] = note
        calibrated = score.result.difficulty_threshold if score is not None else None
        decision = self.policy.decide(view, snaps,
                                      None if score is None else score.result.mean_loss,
                                      signals=record, threshold=calibrated)
        return decision, score

    async def _score_prompt(
        self, prompt: str, snaps: list[BackendSnapshot], deadline: float
    ) -> tuple[PromptScore | None, str]:
        """The edge model's loss on the prompt, or None and why not (never fails the request)."""
        scorers = self.calls.resolve(self.policy.scorers(snaps))
        if not scorers:
            return None, "no edge node to score on"
        try:
            scored, backend = await self.calls.score(
                scorers, prompt, min(deadline, time.monotonic() + self.config.score_timeout_s))
        except TandemError as e:
            return None, f"skipped: {e.status} {e.message}"
        r = scored.result
        return scored, f"{backend.label}: loss {r.mean_loss:.3f} over {r.prompt_tokens} tokens"
