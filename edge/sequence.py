"""One edge sequence between the event loop and its decode thread.

``decode_worker`` runs in a thread of the model's pool and hands each token to the event loop
as it exists; ``chunk_stream`` turns those events into chunks on the loop (text through
TextStream, stop sequences, timings). A request keeps the ``LoadedModel`` it started on, so a
hot swap never mixes versions inside one answer.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from core.engine_api import Chunk, EngineInfo, Timings, Usage
from core.errors import TandemError
from core.request import GenerationRequest
from edge.runtime import EdgeRuntime
from model.textstream import TextStream
from model.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class End:
    """The worker's last event: why decoding ended and when."""

    reason: str  # "eos" | "length"
    at: float


# What a worker thread hands to the event loop: (token id, time produced), End, or an error.
Event = tuple[int, float] | End | BaseException


@dataclass(eq=False)
class LoadedModel:
    """One loaded artifact with its own threads; a request pins the model it started on."""

    runtime: EdgeRuntime
    tokenizer: Tokenizer
    info: EngineInfo
    # A cancelled sequence frees its slot at once while its thread finishes the step it is
    # in; the spare threads keep that step from delaying the next admitted sequence.
    decode_pool: ThreadPoolExecutor
    # Scores are one prefill each: their own threads, so they never wait behind decoding.
    score_pool: ThreadPoolExecutor
    # The router's difficulty threshold measured for this version (calibration.json), if any.
    difficulty_threshold: float | None = None
    users: int = 0  # generations and scores running on this model
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def version(self) -> str:
        return self.info.served_by.model_version

    def close(self) -> None:
        # No wait: a thread mid-step sees its sequence cancelled and exits at the next token.
        for pool in (self.decode_pool, self.score_pool):
            pool.shutdown(wait=False, cancel_futures=True)


@dataclass(eq=False)
class EdgeSequence:
    """One admitted request: its prompt ids, its model and the channel from its worker thread."""

    request: GenerationRequest
    prompt_ids: list[int]
    model: LoadedModel
    events: asyncio.Queue[Event]
    # Set by the event loop (client gone, stop matched, deadline, shutdown); read by the worker.
    cancelled: threading.Event = field(default_factory=threading.Event)


def decode_worker(seq: EdgeSequence, loop: asyncio.AbstractEventLoop) -> None:
    """Worker thread: run one sequence, handing each token to the loop as it exists."""
    put: Callable[[Event], object] = lambda event: loop.call_soon_threadsafe(  # noqa: E731
        seq.events.put_nowait, event
    )
    req, runtime = seq.request, seq.model.runtime
    try:
        if seq.cancelled.is_set():
            return
        count = 0
        tokens = runtime.generate(
            seq.prompt_ids,
            req.max_tokens,
            temperature=req.temperature,
            top_k=req.top_k,
            top_p=req.top_p,
            seed=req.seed,
        )
        for token in tokens:
            if seq.cancelled.is_set():
                return
            count += 1
            put((token, time.monotonic()))
            if req.deadline is not None and time.monotonic() > req.deadline:
                return  # the stream's timer reports it; stop spending CPU now
        # EdgeRuntime.generate stops before EOS, so fewer tokens than asked means EOS.
        put(End("length" if count >= req.max_tokens else "eos", time.monotonic()))
    except Exception as e:
        if loop.is_closed():
            return  # the server is gone; nobody is listening
        log.exception("edge decode failed for request %s", req.request_id)
        put(e)


async def chunk_stream(
    seq: EdgeSequence, arrival: float, admitted: float
) -> AsyncIterator[Chunk]:
    """Turn the worker's events into chunks: text via TextStream, stop sequences, timings."""
    stream = TextStream(seq.model.tokenizer, seq.request.stop)
    generated = 0
    first_at: float | None = None
    while True:
        # Everything that arrived since the last chunk goes out as one (a slow reader gets
        # fewer, larger chunks instead of a growing backlog).
        events = [await seq.events.get()]
        while not seq.events.empty():
            events.append(seq.events.get_nowait())
        texts: list[str] = []
        ids: list[int] = []
        finish: str | None = None
        end_at = time.monotonic()
        for event in events:
            if isinstance(event, TandemError):
                raise event
            if isinstance(event, BaseException):
                raise TandemError(f"the edge runtime failed: {event}") from event
            if isinstance(event, End):
                finish, end_at = event.reason, event.at
                break
            token, end_at = event
            generated += 1
            first_at = first_at or end_at
            ids.append(token)
            texts.append(stream.push(token))
            if stream.stopped:
                finish = "stop"
                break
        if finish is None:
            yield Chunk("".join(texts), tuple(ids))
            continue
        seq.cancelled.set()  # a stop sequence: the worker may be a token ahead
        if finish != "stop":
            texts.append(stream.finish())
        yield Chunk(
            "".join(texts),
            tuple(ids),
            finish,
            Usage(prompt_tokens=len(seq.prompt_ids), completion_tokens=generated),
            Timings(
                queue_ms=(admitted - arrival) * 1000,
                time_to_first_token_ms=((first_at or end_at) - arrival) * 1000,
                total_ms=(end_at - arrival) * 1000,
            ),
        )
        return
