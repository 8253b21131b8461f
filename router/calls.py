"""The router's calls to its backends: plain requests out, plain chunks and scores back.

The other edge of the request flow from the servicer: ``relay`` and ``score_on`` speak gRPC to
the tiers, and this file turns their protobuf into ``RoutedChunk`` / ``PromptScore`` once, so
router/flow.py and router/cascade.py never see a protobuf message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from core import convert
from core.engine_api import Chunk, ScoreResult, ServedBy
from core.request import ChatMessage, GenerationRequest
from protos.tandem.v1 import inference_pb2 as pb
from router.backends import Backend, BackendPool
from router.policy import BackendSnapshot
from router.relay import RelayOutcome, RelayTimeouts, relay, score_on


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
        *, messages: Sequence[ChatMessage] = (),
    ) -> tuple[PromptScore, Backend]:
        """``prompt`` (or ``messages``, as the backend renders them) scored by the first of
        ``backends`` that answers (see ``score_on``)."""
        request = pb.ScoreRequest(prompt=prompt, messages=convert.messages_to_proto(messages))
        resp, backend = await score_on(backends, request, deadline, self.timeouts, attempts)
        threshold = (resp.difficulty_threshold if resp.HasField("difficulty_threshold")
                     else None)
        served_by = (convert.served_by_from_proto(resp.served_by) if resp.HasField("served_by")
                     else None)
        return PromptScore(ScoreResult(resp.mean_loss, resp.prompt_tokens, threshold),
                           served_by), backend
