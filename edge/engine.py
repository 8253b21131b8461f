"""The edge node's engine: the Engine protocol (core/engine_api.py) over an
onnxruntime-genai artifact on CPU.

Admission control bounds the work: at most ``max_concurrency`` sequences decode and at most
``max_queue`` wait; a request beyond that is refused at once with ``Overloaded`` and a
retry-after hint, never queued past its deadline. Each admitted sequence decodes with its own
genai Generator in a worker thread and hands every token to the event loop as it is produced;
a closed stream, a stop sequence or a passed deadline ends it at the next token and frees its
slot at once. No torch and no transformers: this is what an edge node imports.

``swap_to`` replaces the model without dropping a request: each request pins the model it
started on, so its tokens, text and ``served_by`` never mix versions, and the switch is one
assignment between two requests. Loading, verifying, warming up and releasing models is
``model_slot.py``'s; this file does not read artifacts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from core.engine_api import Chunk, EngineInfo, EngineLoad, ScoreResult
from core.errors import (
    DeadlineExceeded,
    InvalidRequest,
    TandemError,
    Unavailable,
    WrongState,
)
from core.request import ChatMessage, GenerationRequest
from edge.admission import Admission
from edge.config import EdgeEngineConfig
from edge.model_slot import ModelSlot
from edge.outcomes import Tally, VersionOutcome
from edge.runtime import EdgeRuntime
from edge.sequence import EdgeSequence, LoadedModel, chunk_stream, decode_worker

log = logging.getLogger(__name__)

# Prompts longer than this (characters) are tokenized in a thread: a 32 KiB prompt takes ~15 ms.
_INLINE_ENCODE_CHARS = 2048


class EdgeEngine:
    """Serves one edge artifact at a time: streaming generation, scoring, live load, hot swap."""

    def __init__(self, config: EdgeEngineConfig) -> None:
        self.config = config
        self._slot = ModelSlot(config)
        self._admission = Admission(config.max_concurrency, config.max_queue)
        self._active: set[EdgeSequence] = set()
        self._draining = False
        self._outcomes: dict[str, Tally] = {}
        self._tokens_generated = 0

    # ---- Engine protocol ----------------------------------------------------------------

    @property
    def info(self) -> EngineInfo:
        return self._slot.info

    @property
    def runtime(self) -> EdgeRuntime | None:
        """The model new requests go to (None before ``start`` and after ``stop``)."""
        model = self._slot.current
        return model.runtime if model is not None else None

    @property
    def loading_version(self) -> str | None:
        """The version a swap is loading and warming up right now, if any."""
        return self._slot.loading

    @property
    def tokens_generated(self) -> int:
        """Completion tokens of every finished request since start (for a tokens/s rate)."""
        return self._tokens_generated

    @property
    def healthy(self) -> bool:
        """A model is loaded and new requests are accepted."""
        return self._slot.current is not None and not self._draining

    def load(self) -> EngineLoad:
        return EngineLoad(
            in_flight=self._admission.running,
            queue_depth=self._admission.queued,
            slots=self.config.max_concurrency,
            queue_capacity=self.config.max_queue,
        )

    def take_outcomes(self) -> list[VersionOutcome]:
        """Outcomes per model version since the previous call (the agent reports them)."""
        tallies, self._outcomes = self._outcomes, {}
        return [tally.summary(version) for version, tally in tallies.items()]

    async def start(self) -> None:
        """Verify and load the artifact (in a thread); then requests are accepted."""
        if self._slot.current is not None:
            return
        model = await self._slot.start()
        self._draining = False
        log.info(
            "edge engine %s: %s, %d slots, queue %d, context %d",
            self.config.node_id, model.version, self.config.max_concurrency,
            self.config.max_queue, model.info.max_context,
        )

    async def stop(self, grace_s: float) -> None:
        """Refuse new work, let accepted work finish for up to ``grace_s``, then end the rest."""
        self._draining = True
        try:
            if not self._admission.idle:
                await asyncio.wait_for(self._admission.wait_idle(), grace_s)
        except TimeoutError:
            log.warning(
                "edge engine: %d sequences still running after %.1f s grace; ending them",
                len(self._active), grace_s,
            )
            err = Unavailable("the edge node shut down before the request finished; retry")
            self._admission.refuse_waiters(err)
            self._end(self._active, err)
        self._slot.close()

    async def swap_to(self, artifact_dir: str | Path) -> None:
        """Serve ``artifact_dir`` from now on without failing a request; returns once the old
        model's requests have finished and it is released.

        Raises ``SwapFailed`` (model_slot.py) when the new artifact does not verify, load or
        warm up: then nothing changed and the old model keeps serving.
        """
        slot = self._slot
        async with slot.swap_lock:  # one swap at a time
            old = slot.current
            if old is None or self._draining:
                raise WrongState(
                    f"edge node {self.config.node_id} is not serving (not started or shutting "
                    "down); start it before swapping its model"
                )
            new = await slot.prepare(Path(artifact_dir), old, lambda: self._draining)
            if new is None:  # already serving that version
                return
            # One assignment on the event loop thread: every request that starts from here on
            # pins the new model; those already running keep the old one.
            slot.switch(new)
            log.info(
                "edge engine %s: switched %s -> %s; %d requests finishing on the old model",
                self.config.node_id, old.version, new.version, old.users,
            )
            await slot.retire(old, self._end_requests_on)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Stream the completion; the last chunk carries finish_reason, usage and timings."""
        arrival = time.monotonic()
        # Pinned before the first await: GenerateStream read info.served_by just before this,
        # so a swap can't come between the version it reports and the model that answers.
        model = self._pin()
        try:
            ids = await self._encode(model, request.prompt, request.messages)
            max_context = model.info.max_context
            if len(ids) + request.max_tokens > max_context:
                room = max_context - len(ids)
                hint = (
                    f"lower max_tokens to at most {room}"
                    if room >= 1
                    else "shorten the prompt (or send it to the cloud tier)"
                )
                raise InvalidRequest(
                    f"prompt is {len(ids)} tokens and max_tokens is {request.max_tokens}; "
                    f"together they must fit the edge model's context of {max_context} "
                    f"tokens: {hint}"
                )
            if request.deadline is not None and arrival >= request.deadline:
                raise DeadlineExceeded("the request's deadline had passed when it arrived")
            await self._admission.acquire(request.deadline, f"edge node {self.config.node_id}")
            admitted = time.monotonic()
            loop = asyncio.get_running_loop()
            seq = EdgeSequence(request, ids, model, asyncio.Queue())
            self._active.add(seq)
            timer = None
            if request.deadline is not None:
                # One timer per request, not a timeout per token: it wakes the stream to fail it.
                expired = DeadlineExceeded("the request's deadline passed during generation")
                timer = loop.call_later(
                    request.deadline - time.monotonic(), seq.events.put_nowait, expired
                )
            ok: bool | None = None  # None: the client went away (not the model's outcome)
            tokens = 0
            try:
                self._launch(seq, loop)
                async for chunk in chunk_stream(seq, arrival, admitted):
                    if chunk.usage is not None:
                        tokens = chunk.usage.completion_tokens
                    yield chunk
                ok = True
            except Exception:
                ok = False
                raise
            finally:
                # Runs on completion, error, client cancel (CancelledError) and aclose().
                seq.cancelled.set()
                if timer is not None:
                    timer.cancel()
                self._active.discard(seq)
                self._admission.release(time.monotonic() - admitted)
                if ok is not None:
                    self._record(model.version, ok, time.monotonic() - arrival, tokens)
        finally:
            self._unpin(model)

    async def score(
        self, prompt: str, messages: tuple[ChatMessage, ...] = ()
    ) -> ScoreResult:
        """Mean per-token loss of the prompt from one prefill (the router's difficulty signal)."""
        model = self._pin()
        try:
            ids = await self._encode(model, prompt, messages)
            if len(ids) < 2:  # BOS alone predicts nothing
                raise InvalidRequest("prompt must be non-empty text")
            if len(ids) > model.info.max_context:
                raise InvalidRequest(
                    f"prompt is {len(ids)} tokens; the edge model scores at most "
                    f"{model.info.max_context} tokens (its context): shorten the prompt"
                )
            loss = await asyncio.get_running_loop().run_in_executor(
                model.score_pool, model.runtime.score, ids
            )
            return ScoreResult(mean_loss=loss, prompt_tokens=len(ids),
                               difficulty_threshold=model.difficulty_threshold)
        except RuntimeError as e:
            if "shutdown" not in str(e):  # a pool closed by stop() or a swap's drain timeout
                raise
            raise Unavailable(f"edge node {self.config.node_id} is shutting down; retry") from e
        finally:
            self._unpin(model)

    # ---- internals ----------------------------------------------------------------------

    def _check_accepting(self) -> LoadedModel:
        if self._draining:
            raise Unavailable(
                f"edge node {self.config.node_id} is draining (shutting down); "
                "send new requests to another backend"
            )
        model = self._slot.current
        if model is None:
            raise Unavailable(f"edge node {self.config.node_id} is loading its model; retry")
        return model

    def _pin(self) -> LoadedModel:
        """The model a new request runs on, held until ``_unpin`` (a swap drains it)."""
        model = self._check_accepting()
        model.users += 1
        model.idle.clear()
        return model

    def _unpin(self, model: LoadedModel) -> None:
        model.users -= 1
        if model.users == 0:
            model.idle.set()

    def _record(self, version: str, ok: bool, latency_s: float, tokens: int) -> None:
        tally = self._outcomes.setdefault(version, Tally())
        tally.requests += 1
        tally.errors += 0 if ok else 1
        tally.tokens += tokens
        tally.latencies_ms.append(latency_s * 1000)
        self._tokens_generated += tokens

    def _end_requests_on(self, old: LoadedModel) -> None:
        """A swap's drain ran out of time: end the requests still pinned to ``old``."""
        stuck = {seq for seq in self._active if seq.model is old}
        log.warning(
            "edge engine: %d requests still on %s after %.0f s; ending them",
            len(stuck), old.version, self.config.swap_drain_s,
        )
        self._end(stuck, Unavailable("the edge node replaced its model mid-request; retry"))

    @staticmethod
    def _end(sequences: set[EdgeSequence], err: TandemError) -> None:
        for seq in list(sequences):
            seq.cancelled.set()
            seq.events.put_nowait(err)

    async def _encode(
        self, model: LoadedModel, prompt: str, messages: tuple[ChatMessage, ...] = ()
    ) -> list[int]:
        # Tandem's tokenizer, not genai's: BOS where the model wants it, chat templates.
        size = len(prompt) + sum(len(m.content) for m in messages)
        if size <= _INLINE_ENCODE_CHARS:
            return model.tokenizer.encode_prompt(prompt, messages)
        return await asyncio.to_thread(model.tokenizer.encode_prompt, prompt, messages)

    def _launch(self, seq: EdgeSequence, loop: asyncio.AbstractEventLoop) -> None:
        """Start decoding ``seq`` off the event loop."""
        # A Generator per sequence, not og.Engine: via gRPC on 2 cores 4 streams got 4.1-4.8k
        # vs 1.8-4.3k tok/s at half the TTFT, and seeds work (static og.Engine has none).
        try:
            seq.model.decode_pool.submit(decode_worker, seq, loop)
        except RuntimeError:  # its pool closed: stop() or a swap's drain timeout
            raise Unavailable(f"edge node {self.config.node_id} is shutting down; retry") from None
