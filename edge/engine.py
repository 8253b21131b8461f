"""The edge node's engine: the Engine protocol (core/engine_api.py) over an
onnxruntime-genai artifact on CPU.

Admission control bounds the work: at most ``max_concurrency`` sequences decode and at most
``max_queue`` wait; a request beyond that is refused at once with ``Overloaded`` and a
retry-after hint, never queued past its deadline. Each admitted sequence decodes with its own
genai Generator in a worker thread and hands every token to the event loop as it is produced;
a closed stream, a stop sequence or a passed deadline ends it at the next token and frees its
slot at once. No torch and no transformers: this is what an edge node imports.

``swap_to`` replaces the model without dropping a request: the new artifact is verified, loaded
beside the old one and warmed up; then, between two requests, new work goes to it while work
already running on the old model finishes there, and only then is the old model released. Each
request pins the model it started on, so its tokens, text and ``served_by`` never mix versions.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from core.engine_api import (
    Chunk,
    EngineInfo,
    EngineLoad,
    ScoreResult,
    ServedBy,
)
from core.errors import (
    DeadlineExceeded,
    InvalidRequest,
    TandemError,
    Unavailable,
    WrongState,
)
from core.request import GenerationRequest, Limits
from edge.admission import Admission
from edge.outcomes import Tally, VersionOutcome
from edge.runtime import EdgeRuntime
from edge.sequence import EdgeSequence, LoadedModel, chunk_stream, decode_worker
from model.manifest import CALIBRATION_FILE, Manifest, read_manifest
from model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Prompts longer than this (characters) are tokenized in a thread: a 32 KiB prompt takes ~15 ms.
_INLINE_ENCODE_CHARS = 2048
# A swapped-in model decodes this before it takes traffic (first-call allocations, every weight
# touched), as the server's warm-up does at start.
_WARMUP_PROMPT = "Return the"


class SwapFailed(TandemError):
    """A new model could not be loaded or warmed up; the old one keeps serving."""

    status = "FAILED_PRECONDITION"


@dataclass(frozen=True)
class EdgeEngineConfig:
    """What an edge engine serves and how much work it takes on at once."""

    artifact_dir: Path
    node_id: str = "edge-0"
    # Sequences decoding in parallel; each holds a genai Generator (its own KV cache).
    max_concurrency: int = 4
    # Requests that may wait for a slot; one more is refused with RESOURCE_EXHAUSTED.
    max_queue: int = 16
    # ONNX Runtime intra-op threads per session; None: ORT's default (one per core).
    threads: int | None = None
    limits: Limits = field(default_factory=Limits)
    # After a swap, requests still running on the old model get this long before they are
    # ended (a client that stops reading must not pin an old model in memory forever).
    swap_drain_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads}")


def _engine_info(config: EdgeEngineConfig, manifest: Manifest, max_context: int) -> EngineInfo:
    return EngineInfo(
        served_by=ServedBy("edge", config.node_id, manifest.model_version),
        model_name=manifest.base_version,
        max_context=max_context,
        max_new_tokens=min(config.limits.max_new_tokens, max_context - 1),
        precision=manifest.quantization,
    )


class EdgeEngine:
    """Serves one edge artifact at a time: streaming generation, scoring, live load, hot swap."""

    def __init__(self, config: EdgeEngineConfig) -> None:
        self.config = config
        artifact = Path(config.artifact_dir)
        # Info comes from the manifest and genai_config.json alone, so it is there while the
        # model loads (the servicer answers Info before health turns SERVING).
        genai = json.loads((artifact / "genai_config.json").read_text())
        self._info = _engine_info(
            config, read_manifest(artifact), int(genai["model"]["context_length"])
        )
        self._model: LoadedModel | None = None
        self._retiring: set[LoadedModel] = set()  # swapped out, finishing their requests
        self._loading: str | None = None
        self._swap_lock = asyncio.Lock()
        self._admission = Admission(config.max_concurrency, config.max_queue)
        self._active: set[EdgeSequence] = set()
        self._draining = False
        self._outcomes: dict[str, Tally] = {}
        self._tokens_generated = 0

    # ---- Engine protocol ----------------------------------------------------------------

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def runtime(self) -> EdgeRuntime | None:
        """The model new requests go to (None before ``start`` and after ``stop``)."""
        return self._model.runtime if self._model is not None else None

    @property
    def loading_version(self) -> str | None:
        """The version a swap is loading and warming up right now, if any."""
        return self._loading

    @property
    def tokens_generated(self) -> int:
        """Completion tokens of every finished request since start (for a tokens/s rate)."""
        return self._tokens_generated

    @property
    def healthy(self) -> bool:
        """A model is loaded and new requests are accepted."""
        return self._model is not None and not self._draining

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
        if self._model is not None:
            return
        model = await self._load(Path(self.config.artifact_dir))
        self._model, self._info = model, model.info
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
        for model in (self._model, *self._retiring):
            if model is not None:
                model.close()
        self._retiring.clear()
        self._model = None

    async def swap_to(self, artifact_dir: str | Path) -> None:
        """Serve ``artifact_dir`` from now on without failing a request; returns once the old
        model's requests have finished and it is released.

        Raises ``SwapFailed`` when the new artifact does not verify, load or warm up: then
        nothing changed and the old model keeps serving.
        """
        artifact = Path(artifact_dir)
        async with self._swap_lock:  # one swap at a time
            old = self._model
            if old is None or self._draining:
                raise WrongState(
                    f"edge node {self.config.node_id} is not serving (not started or shutting "
                    "down); start it before swapping its model"
                )
            try:
                version = read_manifest(artifact).model_version
                if version == old.version:
                    log.info("edge engine: already serving %s; nothing to swap", version)
                    return
                self._loading = version
                new = await self._load(artifact)  # verifies every file's size and sha256
                try:
                    await asyncio.get_running_loop().run_in_executor(
                        new.decode_pool, self._warm_up, new
                    )
                    if self._draining:
                        raise Unavailable("the node began shutting down during the swap")
                except BaseException:
                    new.close()
                    raise
            except Exception as e:
                log.error("swap to %s failed; still serving %s: %s", artifact, old.version, e)
                raise SwapFailed(
                    f"edge node {self.config.node_id} could not swap to {artifact}: {e}; "
                    f"it keeps serving {old.version}"
                ) from e
            finally:
                self._loading = None
            # One assignment on the event loop thread: every request that starts from here on
            # pins the new model; those already running keep the old one.
            self._model, self._info = new, new.info
            self._retiring.add(old)
            log.info(
                "edge engine %s: switched %s -> %s; %d requests finishing on the old model",
                self.config.node_id, old.version, new.version, old.users,
            )
            await self._retire(old)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Stream the completion; the last chunk carries finish_reason, usage and timings."""
        arrival = time.monotonic()
        # Pinned before the first await: GenerateStream read info.served_by just before this,
        # so a swap can't come between the version it reports and the model that answers.
        model = self._pin()
        try:
            ids = await self._encode(model, request.prompt)
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

    async def score(self, prompt: str) -> ScoreResult:
        """Mean per-token loss of the prompt from one prefill (the router's difficulty signal)."""
        model = self._pin()
        try:
            ids = await self._encode(model, prompt)
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
        if self._model is None:
            raise Unavailable(f"edge node {self.config.node_id} is loading its model; retry")
        return self._model

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

    async def _load(self, artifact: Path) -> LoadedModel:
        """Verify and load an artifact off the event loop, with threads of its own."""
        runtime = await asyncio.to_thread(EdgeRuntime.load, artifact, threads=self.config.threads)
        tokenizer = await asyncio.to_thread(Tokenizer.from_dir, artifact)
        eos_ok = tokenizer.eos_id in runtime.eos_token_ids
        if tokenizer.bos_id != runtime.bos_token_id or not eos_ok:
            raise ValueError(
                f"{artifact}: tokenizer special ids (bos {tokenizer.bos_id}, eos "
                f"{tokenizer.eos_id}) disagree with genai_config.json (bos "
                f"{runtime.bos_token_id}, eos {runtime.eos_token_ids}); re-export the artifact"
            )
        slots = self.config.max_concurrency
        return LoadedModel(
            runtime,
            tokenizer,
            _engine_info(self.config, runtime.manifest, runtime.max_context),
            ThreadPoolExecutor(2 * slots, thread_name_prefix="edge-decode"),
            ThreadPoolExecutor(2, thread_name_prefix="edge-score"),
            read_difficulty_threshold(artifact),
        )

    @staticmethod
    def _warm_up(model: LoadedModel) -> None:
        """Worker thread: one short greedy generation on a model that takes no traffic yet."""
        ids = model.tokenizer.encode(_WARMUP_PROMPT, add_bos=True)
        for _ in model.runtime.generate(ids, 2):
            pass

    async def _retire(self, old: LoadedModel) -> None:
        """Let the requests pinned to ``old`` finish (up to swap_drain_s), then release it."""
        try:
            await asyncio.wait_for(old.idle.wait(), self.config.swap_drain_s)
        except TimeoutError:
            stuck = {seq for seq in self._active if seq.model is old}
            log.warning(
                "edge engine: %d requests still on %s after %.0f s; ending them",
                len(stuck), old.version, self.config.swap_drain_s,
            )
            self._end(stuck, Unavailable("the edge node replaced its model mid-request; retry"))
        finally:
            self._retiring.discard(old)
            old.close()
        log.info("edge engine %s: released %s", self.config.node_id, old.version)

    @staticmethod
    def _end(sequences: set[EdgeSequence], err: TandemError) -> None:
        for seq in list(sequences):
            seq.cancelled.set()
            seq.events.put_nowait(err)

    async def _encode(self, model: LoadedModel, text: str) -> list[int]:
        # genai's own tokenizer never adds BOS; the model was trained with it.
        if len(text) <= _INLINE_ENCODE_CHARS:
            return model.tokenizer.encode(text, add_bos=True)
        return await asyncio.to_thread(model.tokenizer.encode, text, True)

    def _launch(self, seq: EdgeSequence, loop: asyncio.AbstractEventLoop) -> None:
        """Start decoding ``seq`` off the event loop."""
        # A Generator per sequence, not og.Engine: via gRPC on 2 cores 4 streams got 4.1-4.8k
        # vs 1.8-4.3k tok/s at half the TTFT, and seeds work (static og.Engine has none).
        try:
            seq.model.decode_pool.submit(decode_worker, seq, loop)
        except RuntimeError:  # its pool closed: stop() or a swap's drain timeout
            raise Unavailable(f"edge node {self.config.node_id} is shutting down; retry") from None


def read_difficulty_threshold(artifact: Path) -> float | None:
    """The calibrated threshold an artifact carries (``calibration.json``), or None."""
    try:
        raw = json.loads((artifact / CALIBRATION_FILE).read_text())
        value = float(raw["difficulty_threshold"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as e:
        log.warning("%s: unreadable %s (%s); the router's threshold applies", artifact,
                    CALIBRATION_FILE, e)
        return None
    return value if math.isfinite(value) else None
