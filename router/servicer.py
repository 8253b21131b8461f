"""The router's tandem.v1.Inference servicer: protobuf in, the request flow, protobuf out.

Thin like the tiers' servicer (``core.engine_servicer``): a request is validated into a
``GenerationRequest`` once at entry (the router's Limits: the same checks and messages as the
tiers), the plain ``RequestFlow`` (``router.flow``) admits, caches, decides and relays it and
yields plain chunks, each becomes protobuf once on the way out, and each TandemError becomes one
status in ``abort``. Every response carries the router's load in trailing metadata, for a router
in front of this one; every RPC is counted with its final status. No routing, cache or cascade
logic here.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from core import convert
from core.engine_servicer import IN_FLIGHT_KEY, QUEUE_DEPTH_KEY, SLOTS_KEY, parse_request
from core.errors import TandemError
from core.grpc_server import Undecodable, abort
from core.metrics import RpcRecord
from core.request import GenerationRequest
from protos.tandem.v1 import inference_pb2 as pb
from router.backends import BackendPool
from router.calls import PromptScore, RoutedChunk, routed_to_proto
from router.config import RouterConfig
from router.flow import RequestFlow
from router.frontdoor import FrontDoor
from router.keys import current_key
from router.metrics import RouterMetrics
from router.policy import RoutingPolicy


class RouterServicer:
    """Serves tandem.v1.Inference by routing each request to an edge node or the cloud."""

    def __init__(self, pool: BackendPool, policy: RoutingPolicy, config: RouterConfig,
                 metrics: RouterMetrics | None = None, front: FrontDoor | None = None) -> None:
        self.pool = pool
        # Keys, limits and the cache; without Redis only the local cache is on.
        front = front or FrontDoor(config.front_door)
        # A private registry when none is given: call sites never ask "if metrics".
        self.metrics = metrics or RouterMetrics()
        self.config = config
        self.flow = RequestFlow(pool, policy, config, self.metrics, front)
        self.in_flight = 0

    @property
    def front(self) -> FrontDoor:
        return self.flow.front

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
        self, request: pb.GenerateRequest | Undecodable,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.GenerateResponse:
        self.in_flight += 1
        try:
            with self.metrics.track("Generate", context) as rpc:
                req = await self._request(request, context)
                rpc.route = req.route
                chunks: list[RoutedChunk] = []
                try:
                    # Buffered: nothing reaches the client before the answer is whole, so a
                    # backend failing at any point may still fail over.
                    async for chunk in self._generate(req, context, buffered=True):
                        chunks.append(chunk)
                        record_chunk(rpc, chunk)
                except TandemError as e:
                    await abort(context, e, self.load_trailers())
                context.set_trailing_metadata(self.load_trailers())
                first = chunks[0]
                return convert.response_from_chunks(
                    [c.chunk for c in chunks], served_by=first.served_by,
                    request_id=req.request_id, route_reason=first.route_reason,
                    cached=first.cached,
                )
        finally:
            self.in_flight -= 1

    async def GenerateStream(
        self, request: pb.GenerateRequest | Undecodable,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.GenerateChunk]:
        self.in_flight += 1
        try:
            with self.metrics.track("GenerateStream", context) as rpc:
                req = await self._request(request, context)
                rpc.route = req.route
                try:
                    async for chunk in self._generate(req, context, buffered=False):
                        record_chunk(rpc, chunk)
                        yield routed_to_proto(chunk)
                except TandemError as e:
                    await abort(context, e, self.load_trailers())
                context.set_trailing_metadata(self.load_trailers())
        finally:
            self.in_flight -= 1

    async def Score(
        self, request: pb.ScoreRequest | Undecodable,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.ScoreResponse:
        """Forward to an edge node: difficulty is the edge model's loss."""
        self.in_flight += 1
        try:
            with self.metrics.track("Score", context):
                try:
                    # Undecodable bytes have no prompt: the same INVALID_ARGUMENT as an empty one.
                    if isinstance(request, Undecodable):
                        request = pb.ScoreRequest()
                    prompt, messages = convert.score_input_from_proto(
                        request, self.flow.config.limits)
                    scored = await self.flow.score(prompt, messages, self._deadline(context))
                except TandemError as e:
                    await abort(context, e, self.load_trailers())
                context.set_trailing_metadata(self.load_trailers())
                return score_to_proto(scored)
        finally:
            self.in_flight -= 1

    async def Info(
        self, request: pb.InfoRequest | Undecodable,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.InfoResponse:
        """The router itself (tier ROUTER), describing the largest model behind it."""
        info = self.flow.info()
        self.metrics.observe_request("none", "router", "OK", method="Info")
        context.set_trailing_metadata(self.load_trailers(own=0))
        return convert.info_to_proto(info)

    # -- one request ---------------------------------------------------------------------------

    async def _request(
        self, msg: pb.GenerateRequest | Undecodable,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> GenerationRequest:
        return await parse_request(msg, self.config.limits, context, self.load_trailers)

    def _deadline(self, context: grpc.aio.ServicerContext[Any, Any]) -> float:
        remaining = context.time_remaining()
        return time.monotonic() + (self.config.default_timeout_s if remaining is None
                                   else remaining)

    def _generate(
        self, req: GenerationRequest, context: grpc.aio.ServicerContext[Any, Any], *,
        buffered: bool,
    ) -> AsyncIterator[RoutedChunk]:
        # The caller's key, as the auth interceptor set it for this call's task.
        return self.flow.generate(req, current_key(), self._deadline(context),
                                  buffered=buffered)


def record_chunk(rpc: RpcRecord, chunk: RoutedChunk) -> None:
    """Book a chunk sent to the client: time to first token, tokens, who served (or cache)."""
    tier = None
    if chunk.labelled or chunk.chunk.finish_reason is not None:  # those that name who served
        tier = "cache" if chunk.cached else chunk.served_by.tier
    rpc.sent(len(chunk.chunk.token_ids), tier)


def score_to_proto(scored: PromptScore) -> pb.ScoreResponse:
    """The edge node's Score as the client gets it (who scored it, when the node said)."""
    r = scored.result
    msg = pb.ScoreResponse(mean_loss=r.mean_loss, prompt_tokens=r.prompt_tokens,
                           difficulty_threshold=r.difficulty_threshold)
    if scored.served_by is not None:
        msg.served_by.CopyFrom(convert.served_by_to_proto(scored.served_by))
    return msg
