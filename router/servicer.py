"""The router's tandem.v1.Inference servicer: validate, ask the policy, relay to a backend.

Thin like the tiers' servicer: requests are validated with the router's Limits (the same checks
and messages as the tiers), the policy decides from backend snapshots (plus an edge Score of the
prompt when it needs the difficulty), ``relay`` calls backends with failover, and each
TandemError becomes one status in ``abort``. One DEBUG line per request records what decided.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import grpc

from core import convert
from core.engine_servicer import IN_FLIGHT_KEY, QUEUE_DEPTH_KEY, SLOTS_KEY, parse_request
from core.errors import InvalidRequest, TandemError, Unavailable
from core.grpc_server import Undecodable, abort
from core.metrics import RpcRecord
from core.request import GenerationRequest
from protos.tandem.v1 import inference_pb2 as pb
from router.backends import Backend, BackendPool
from router.cache import cacheable
from router.config import RouterConfig
from router.frontdoor import FrontDoor, cache_versions, replay
from router.keys import current_key
from router.metrics import RouterMetrics
from router.policy import CLOUD, EDGE, BackendSnapshot, Decision, RequestView, RoutingPolicy
from router.relay import RelayOutcome, RelayTimeouts, relay, score_on

log = logging.getLogger(__name__)


class RouterServicer:
    """Serves tandem.v1.Inference by routing each request to an edge node or the cloud."""

    def __init__(self, pool: BackendPool, policy: RoutingPolicy, config: RouterConfig,
                 metrics: RouterMetrics | None = None, front: FrontDoor | None = None) -> None:
        self.pool = pool
        # Keys, limits and the cache; without Redis only the local cache is on.
        self.front = front or FrontDoor(config.front_door)
        # A private registry when none is given: call sites never ask "if metrics".
        self.metrics = metrics or RouterMetrics()
        self.policy = policy
        self.config = config
        self.timeouts = RelayTimeouts(config.first_token_timeout_s,
                                      config.policy.default_retry_after_s)
        self.in_flight = 0

    def load_trailers(self, own: int = 1) -> tuple[tuple[str, str], ...]:
        """The router's load for a router in front of it, without the ``own`` call answering."""
        snaps = [s for s in self.pool.snapshots() if s.available]
        return (
            (IN_FLIGHT_KEY, str(max(0, self.in_flight - own))),
            (QUEUE_DEPTH_KEY, str(sum(s.queue_depth for s in snaps))),
            (SLOTS_KEY, str(sum(s.slots or 0 for s in snaps))),
        )

    # -- Inference -----------------------------------------------------------------------------

    async def Generate(
        self, request: pb.GenerateRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        self.in_flight += 1
        try:
            with self.metrics.track("Generate", context) as rpc:
                req = await self._request(request, context)
                rpc.route = req.route
                chunks: list[pb.GenerateChunk] = []
                try:
                    # Buffered: nothing reaches the client before the answer is whole, so a
                    # backend failing at any point may still fail over.
                    async for chunk in self._generate(req, self._deadline(context),
                                                      buffered=True):
                        chunks.append(chunk)
                        record_chunk(rpc, chunk)
                except TandemError as e:
                    await abort(context, e, self.load_trailers())
                context.set_trailing_metadata(self.load_trailers())
                first = chunks[0]
                return convert.response_from_chunks(
                    [convert.chunk_from_proto(c) for c in chunks],
                    served_by=convert.served_by_from_proto(first.served_by),
                    request_id=req.request_id, route_reason=first.route_reason,
                    cached=first.cached,
                )
        finally:
            self.in_flight -= 1

    async def GenerateStream(
        self, request: pb.GenerateRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateChunk]:
        self.in_flight += 1
        try:
            with self.metrics.track("GenerateStream", context) as rpc:
                req = await self._request(request, context)
                rpc.route = req.route
                try:
                    async for chunk in self._generate(req, self._deadline(context),
                                                      buffered=False):
                        record_chunk(rpc, chunk)
                        yield chunk
                except TandemError as e:
                    await abort(context, e, self.load_trailers())
                context.set_trailing_metadata(self.load_trailers())
        finally:
            self.in_flight -= 1

    async def Score(
        self, request: pb.ScoreRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> pb.ScoreResponse:
        """Forward to an edge node: difficulty is the edge model's loss."""
        self.in_flight += 1
        try:
            with self.metrics.track("Score", context):
                try:
                    if isinstance(request, Undecodable) or not request.prompt.strip():
                        raise InvalidRequest("prompt must be non-empty UTF-8 text")
                    limit = self.config.limits.max_prompt_bytes
                    if len(request.prompt.encode()) > limit:
                        raise InvalidRequest(f"prompt is over the limit of {limit} bytes")
                    scorers = self._backends(self.policy.scorers(self.pool.snapshots()))
                    if not scorers:
                        raise Unavailable("no healthy edge node to score the prompt; retry later")
                    resp, _ = await score_on(scorers, request.prompt, self._deadline(context),
                                             self.timeouts, self.config.policy.max_attempts)
                except TandemError as e:
                    await abort(context, e, self.load_trailers())
                context.set_trailing_metadata(self.load_trailers())
                return resp
        finally:
            self.in_flight -= 1

    async def Info(
        self, request: pb.InfoRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> pb.InfoResponse:
        """The router itself (tier ROUTER), describing the largest model behind it."""
        infos = sorted((b.info for b in self.pool if b.info is not None),
                       key=lambda i: (i.served_by.tier != CLOUD, -i.max_context))
        main = infos[0] if infos else None
        self.metrics.observe_request("none", "router", "OK", method="Info")
        context.set_trailing_metadata(self.load_trailers(own=0))
        return pb.InfoResponse(
            served_by=pb.ServedBy(tier=pb.TIER_ROUTER, node_id=self.config.node_id,
                                  model_version=main.served_by.model_version if main else ""),
            max_context_tokens=max((i.max_context for i in infos), default=0),
            max_new_tokens=min(self.config.limits.max_new_tokens,
                               max((i.max_new_tokens for i in infos), default=0)),
            precision=",".join(sorted({i.precision for i in infos})),
            model_name=main.model_name if main else "",
        )

    # -- one request ---------------------------------------------------------------------------

    async def _request(
        self, msg: pb.GenerateRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> GenerationRequest:
        return await parse_request(msg, self.config.limits, context, self.load_trailers)

    def _deadline(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        return time.monotonic() + (self.config.default_timeout_s if remaining is None
                                   else remaining)

    def _backends(self, snapshots: tuple[BackendSnapshot, ...] | list[BackendSnapshot]
                  ) -> list[Backend]:
        found = (self.pool.get(s.name) for s in snapshots)
        return [b for b in found if b is not None]  # one may have been removed meanwhile

    async def _generate(
        self, req: GenerationRequest, deadline: float, *, buffered: bool
    ) -> AsyncIterator[pb.GenerateChunk]:
        """Rate-limit, answer from the cache or route (logging what decided), remember."""
        started = time.monotonic()
        record: dict[str, Any] = {"id": req.request_id}
        key = current_key()
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
            answer: list[pb.GenerateChunk] = []
            async for chunk in self._route(req, deadline, buffered, record):
                if cacheable(req):
                    answer.append(chunk)
                yield chunk
            await self.front.store(req, answer)
        except TandemError as e:
            record["error"] = f"{e.status}: {e.message}"
            raise
        finally:
            if log.isEnabledFor(logging.DEBUG):
                record["ms"] = round((time.monotonic() - started) * 1000, 1)
                log.debug("route %s", json.dumps(record, default=str))

    async def _route(
        self, req: GenerationRequest, deadline: float, buffered: bool, record: dict[str, Any]
    ) -> AsyncIterator[pb.GenerateChunk]:
        """Decide, then relay (or cascade); the signals that decided go into ``record``."""
        decision, score = await self._decide(req, deadline, record)
        record["reason"] = decision.reason
        msg = convert.request_to_proto(req)
        if decision.cascade:
            async for chunk in self._cascade(req, msg, decision, score, deadline, buffered,
                                             record):
                yield chunk
            return
        outcome = RelayOutcome()
        async for chunk in relay(self._backends(decision.candidates), msg, deadline, outcome,
                                 buffered=buffered, timeouts=self.timeouts):
            if chunk.HasField("served_by"):
                chunk.route_reason = record["reason"] = outcome.reason(decision.reason)
            yield chunk
        record["served_by"] = outcome.backend.label if outcome.backend else None

    async def _decide(
        self, req: GenerationRequest, deadline: float, record: dict[str, Any]
    ) -> tuple[Decision, pb.ScoreResponse | None]:
        """Score the prompt if the policy needs it, then ask the policy (signals into record)."""
        snaps = self.pool.snapshots()
        view = RequestView(
            route=req.route, quality=req.quality, max_tokens=req.max_tokens,
            prompt_bytes=len(req.prompt.encode("utf-8", errors="surrogatepass")),
            time_left_s=deadline - time.monotonic(),
        )
        score: pb.ScoreResponse | None = None
        note = "not needed"
        if self.policy.needs_score(view, snaps):
            score, note = await self._score_prompt(req.prompt, snaps, deadline)
            if score is not None:
                view = replace(view, prompt_tokens=score.prompt_tokens,
                               time_left_s=deadline - time.monotonic())
            snaps = self.pool.snapshots()  # a failed score may have opened a circuit
        record["score"] = note
        calibrated = score.difficulty_threshold if score is not None and \
            score.HasField("difficulty_threshold") else None
        decision = self.policy.decide(view, snaps, None if score is None else score.mean_loss,
                                      signals=record, threshold=calibrated)
        return decision, score

    async def _score_prompt(
        self, prompt: str, snaps: list[BackendSnapshot], deadline: float
    ) -> tuple[pb.ScoreResponse | None, str]:
        """The edge model's loss on the prompt, or None and why not (never fails the request)."""
        scorers = self._backends(self.policy.scorers(snaps))
        if not scorers:
            return None, "no edge node to score on"
        try:
            resp, backend = await score_on(
                scorers, prompt, min(deadline, time.monotonic() + self.config.score_timeout_s),
                self.timeouts)
        except TandemError as e:
            return None, f"skipped: {e.status} {e.message}"
        return resp, f"{backend.label}: loss {resp.mean_loss:.3f} over {resp.prompt_tokens} tokens"

    # -- cascade -------------------------------------------------------------------------------

    async def _cascade(
        self, req: GenerationRequest, msg: pb.GenerateRequest, decision: Decision,
        score: pb.ScoreResponse | None, deadline: float, buffered: bool, record: dict[str, Any],
    ) -> AsyncIterator[pb.GenerateChunk]:
        """The edge answers first (held back); a low-confidence answer goes to the cloud."""
        backends = self._backends(decision.candidates)
        first = RelayOutcome()
        held = [c async for c in relay(backends, msg, deadline, first, buffered=True,
                                       timeouts=self.timeouts)]
        edge = first.backend
        assert edge is not None  # relay raises when no candidate served
        words = ""
        if edge.tier == EDGE:
            answer = "".join(c.text for c in held)
            loss, record["confidence"] = await self._answer_loss(edge, req.prompt, answer, score,
                                                                  deadline)
            escalate, words = self.policy.escalation(loss)
            clouds = [b for b in backends if b.tier == CLOUD]
            if escalate and not clouds:
                words += ", but no cloud backend is free; kept the edge answer"
            elif escalate:
                up = RelayOutcome()
                texts: list[str] = []
                try:
                    async for chunk in relay(clouds, msg, deadline, up, buffered=buffered,
                                             timeouts=self.timeouts):
                        if chunk.HasField("served_by") and up.backend is not None:
                            chunk.route_reason = record["reason"] = up.reason(
                                f"cascade: {words} -> cloud {up.backend.label}")
                        texts.append(chunk.text)
                        yield chunk
                except TandemError as e:
                    if up.committed:
                        raise
                    words += f"; escalation failed ({e.status}), kept the edge answer"
                else:
                    record["served_by"] = up.backend.label if up.backend else None
                    self.metrics.escalation()
                    node = next((c.served_by.node_id for c in held
                                 if c.HasField("served_by")), "")
                    await self._escalated(req, answer, "".join(texts), node or edge.label)
                    return
        reason = first.reason(f"cascade: {words} -> {edge.tier} {edge.label}" if words
                              else decision.reason)
        record["reason"], record["served_by"] = reason, edge.label
        for chunk in held:
            if chunk.HasField("served_by"):
                chunk.route_reason = reason
            yield chunk

    async def _answer_loss(
        self, edge: Backend, prompt: str, answer: str, score: pb.ScoreResponse | None,
        deadline: float,
    ) -> tuple[float | None, str]:
        """The edge model's mean loss on its own answer (two Scores), or None and why not."""
        if score is None:
            return None, "prompt not scored"
        if not answer:
            return None, "empty answer"
        try:
            full, _ = await score_on(
                [edge], prompt + answer,
                min(deadline, time.monotonic() + self.config.score_timeout_s), self.timeouts,
                attempts=1)
        except TandemError as e:
            return None, f"answer score failed: {e.status}"
        loss = self.policy.answer_loss(score.mean_loss, score.prompt_tokens, full.mean_loss,
                                       full.prompt_tokens)
        return loss, "answer loss " + ("unknown" if loss is None else f"{loss:.3f}")

    async def _escalated(self, req: GenerationRequest, edge_answer: str, cloud_answer: str,
                         edge_node: str) -> None:
        log.info("cascade escalated %s (%d prompt bytes) to the cloud", req.request_id,
                 len(req.prompt.encode("utf-8", errors="surrogatepass")))
        hook = self.config.on_escalation
        if hook is None:
            return
        try:
            result = hook(req.prompt, edge_answer, cloud_answer, edge_node)
            if inspect.isawaitable(result):
                await result
        except Exception:  # the client's answer must not depend on the hook
            log.exception("on_escalation hook failed for %s", req.request_id)


def record_chunk(rpc: RpcRecord, chunk: pb.GenerateChunk) -> None:
    """Book a chunk sent to the client: time to first token, tokens, who served (or cache)."""
    tier = None
    if chunk.HasField("served_by"):
        tier = "cache" if chunk.cached else convert.TIER_NAMES.get(chunk.served_by.tier)
    rpc.sent(len(chunk.token_ids), tier)
