"""The router's request flow as a plain object: admit -> cache -> score -> decide -> relay.

``RequestFlow.generate`` takes a validated ``GenerationRequest`` (with the caller's key and
deadline) and yields ``RoutedChunk``s: the engine's chunks plus who served them and why. It
rate-limits and caches through the front door, asks the policy (with an edge Score of the prompt
when the difficulty matters), relays with failover, hands cascades to ``router.cascade``, and
writes one DEBUG line per request saying what decided. ``score`` forwards a client's Score to an
edge node; ``info`` describes the router.

This file imports no grpc and no protobuf and knows no status code or servicer context:
failures are the TandemErrors of ``core.errors``, which the servicer maps to a status. Protobuf
is translated once at each edge of the flow: by the servicer for the client, by
``router.calls`` for the backends.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from core.engine_api import EngineInfo, ServedBy
from core.errors import TandemError, Unavailable
from core.request import ChatMessage, GenerationRequest
from router.backends import BackendPool
from router.cache import cacheable
from router.calls import BackendCalls, PromptScore, RoutedChunk
from router.cascade import Cascade
from router.config import RouterConfig
from router.frontdoor import FrontDoor, cache_versions, replay
from router.keys import KeyRecord
from router.metrics import RouterMetrics
from router.policy import CLOUD, BackendSnapshot, Decision, RequestView, RoutingPolicy
from router.relay import RelayOutcome, RelayTimeouts

log = logging.getLogger(__name__)


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

    async def score(
        self, prompt: str, messages: tuple[ChatMessage, ...], deadline: float
    ) -> PromptScore:
        """A client's Score (validated): forwarded to an edge node, since difficulty is the
        edge's loss."""
        scorers = self.calls.resolve(self.policy.scorers(self.pool.snapshots()))
        if not scorers:
            raise Unavailable("no healthy edge node to score the prompt; retry later")
        scored, _ = await self.calls.score(scorers, prompt, deadline,
                                           self.config.policy.max_attempts, messages=messages)
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
                    async for chunk in replay(hit, req, started):
                        yield chunk
                    return
                self.metrics.cache_miss()
            answer: list[RoutedChunk] = []
            async for chunk in self._route(req, deadline, buffered, record):
                if cacheable(req):
                    answer.append(chunk)
                yield chunk
            if answer:
                await self.front.store(req, [c.chunk for c in answer], answer[0].served_by)
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
            prompt_bytes=self.front.prompt_bytes(req),
            time_left_s=deadline - time.monotonic(),
        )
        score: PromptScore | None = None
        note = "not needed"
        if self.policy.needs_score(view, snaps):
            score, note = await self._score_prompt(req, snaps, deadline)
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
        self, req: GenerationRequest, snaps: list[BackendSnapshot], deadline: float
    ) -> tuple[PromptScore | None, str]:
        """The edge model's loss on the prompt, or None and why not (never fails the request)."""
        scorers = self.calls.resolve(self.policy.scorers(snaps))
        if not scorers:
            return None, "no edge node to score on"
        try:
            scored, backend = await self.calls.score(
                scorers, req.prompt, min(deadline, time.monotonic() + self.config.score_timeout_s),
                messages=req.messages)
        except TandemError as e:
            return None, f"skipped: {e.status} {e.message}"
        r = scored.result
        return scored, f"{backend.label}: loss {r.mean_loss:.3f} over {r.prompt_tokens} tokens"
