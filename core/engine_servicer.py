"""The tandem.v1.Inference servicer over any engine: protobuf in, engine call, protobuf out.

Thin on purpose (the Flower SuperLink servicer is the model): validate, call the engine, map
each TandemError to its status once. Every response carries the engine's load in trailing
metadata so routers learn it without polling. Every RPC is counted with its final status, and
generations with the timings and usage of their last chunk (``ServingMetrics``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from core import convert
from core.engine_api import Chunk, Engine
from core.errors import InvalidRequest, TandemError
from core.grpc_server import Undecodable, abort
from core.metrics import ServingMetrics
from core.request import GenerationRequest, Limits
from protos.tandem.v1 import inference_pb2 as pb

log = logging.getLogger(__name__)

IN_FLIGHT_KEY = "tandem-in-flight"
QUEUE_DEPTH_KEY = "tandem-queue-depth"
SLOTS_KEY = "tandem-slots"
QUEUE_CAPACITY_KEY = "tandem-queue-capacity"


async def parse_request(
    msg: pb.GenerateRequest | Undecodable,
    limits: Limits,
    context: grpc.aio.ServicerContext[Any, Any],
    trailers: Callable[[], Sequence[tuple[str, str]]],
) -> GenerationRequest:
    """The validated request with the client's deadline, or the RPC ends INVALID_ARGUMENT."""
    try:
        if isinstance(msg, Undecodable):
            raise InvalidRequest(
                f"request is not a valid tandem.v1.GenerateRequest ({msg.reason}); "
                "prompt and stop sequences must be UTF-8 text"
            )
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        return convert.request_from_proto(msg, limits, deadline)
    except TandemError as e:
        await abort(context, e, trailers())


class EngineServicer:
    """Serves one engine (cloud or edge) behind the shared Inference API."""

    def __init__(self, engine: Engine, limits: Limits,
                 metrics: ServingMetrics | None = None) -> None:
        self.engine = engine
        self.limits = limits
        # A private registry when none is given: the servicer never needs to ask "if metrics".
        self.metrics = metrics or ServingMetrics(CollectorRegistry(), engine)

    def load_trailers(self) -> tuple[tuple[str, str], ...]:
        load = self.engine.load()
        return (
            (IN_FLIGHT_KEY, str(load.in_flight)),
            (QUEUE_DEPTH_KEY, str(load.queue_depth)),
            (SLOTS_KEY, str(load.slots)),
            (QUEUE_CAPACITY_KEY, str(load.queue_capacity)),
        )

    async def _request(
        self, msg: pb.GenerateRequest | Undecodable,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> GenerationRequest:
        return await parse_request(msg, self.limits, context, self.load_trailers)

    async def Generate(
        self, request: pb.GenerateRequest | Undecodable,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.GenerateResponse:
        with self.metrics.track("Generate", context) as rpc:
            req = await self._request(request, context)
            rpc.route = req.route
            chunks: list[Chunk] = []
            # Read before the engine call, with no await between: the engine binds a request to
            # the model it starts on, and a hot swap may change ``info`` while it runs.
            served_by = self.engine.info.served_by
            try:
                async for chunk in self.engine.generate(req):
                    chunks.append(chunk)
            except TandemError as e:
                await abort(context, e, self.load_trailers())
            context.set_trailing_metadata(self.load_trailers())
            if chunks:
                rpc.finished(chunks[-1])
            return convert.response_from_chunks(
                chunks, served_by=served_by, request_id=req.request_id
            )

    async def GenerateStream(
        self, request: pb.GenerateRequest | Undecodable,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.GenerateChunk]:
        with self.metrics.track("GenerateStream", context) as rpc:
            req = await self._request(request, context)
            rpc.route = req.route
            served_by = self.engine.info.served_by
            first = True
            try:
                async for chunk in self.engine.generate(req):
                    yield convert.chunk_to_proto(
                        chunk, served_by=served_by, request_id=req.request_id, first=first
                    )
                    first = False
                    if chunk.finish_reason is not None:
                        rpc.finished(chunk)
            except TandemError as e:
                await abort(context, e, self.load_trailers())
            context.set_trailing_metadata(self.load_trailers())

    async def Score(
        self, request: pb.ScoreRequest | Undecodable,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.ScoreResponse:
        with self.metrics.track("Score", context):
            try:
                if isinstance(request, Undecodable):
                    raise InvalidRequest("prompt must be non-empty UTF-8 text")
                prompt, messages = convert.score_input_from_proto(request, self.limits)
                served_by = self.engine.info.served_by  # before the await (see Generate)
                result = await self.engine.score(prompt, messages)
            except TandemError as e:
                await abort(context, e, self.load_trailers())
            context.set_trailing_metadata(self.load_trailers())
            return pb.ScoreResponse(
                mean_loss=result.mean_loss,
                prompt_tokens=result.prompt_tokens,
                served_by=convert.served_by_to_proto(served_by),
                difficulty_threshold=result.difficulty_threshold,
            )

    async def Info(
        self, request: pb.InfoRequest | Undecodable,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.InfoResponse:
        with self.metrics.track("Info", context):
            context.set_trailing_metadata(self.load_trailers())
            return convert.info_to_proto(self.engine.info)
