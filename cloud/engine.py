"""The cloud tier's engine: continuous batching of the PyTorch model over a static KV cache.

One engine thread owns the model. Between steps it drops cancelled and expired sequences
(their slots are free at once); then the batcher (cloud/batcher.py) admits waiting ones into
free slots, prefills prompts in chunks, and runs one decode step for every running sequence,
each at its own position in its own cache slot, with its own sampling parameters; on CUDA the
decode step is a replayed CUDA graph (cloud/decode_graphs.py). Tokens go back to the asyncio
side as they are produced. The same code runs on CPU and CUDA: the device is configuration.
Design notes: cloud/README.md.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cloud.batch_step import BatchStepper, DecodeConfig
from cloud.batcher import ContinuousBatcher, TokenSequence
from cloud.kv_budget import plan_kv_cache
from cloud.scheduler import Scheduler, SchedulerConfig
from core.engine_api import (
    Chunk,
    EngineInfo,
    EngineLoad,
    ScoreResult,
    ServedBy,
    Timings,
    Usage,
    merge_chunks,
)
from core.errors import DeadlineExceeded, InvalidRequest, TandemError, Unavailable
from core.request import ChatMessage, GenerationRequest, Limits
from model.checkpoint import checkpoint_version, load_checkpoint, read_metadata
from model.generate import sequence_nll
from model.textstream import TextStream
from model.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CloudEngineConfig:
    checkpoint: Path
    node_id: str = "cloud-0"
    device: str = "cpu"
    # None: bfloat16 on CUDA, float32 on CPU (CPU bf16 matmuls are slow and gain nothing here).
    dtype: str | None = None
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # Longest sequence (prompt + generated) a slot holds; None: the model's context. The KV
    # cache budget may shorten it further (cloud/kv_budget.py).
    max_context: int | None = None
    # Bytes the static KV cache may take; None: a share of the device's free memory.
    kv_cache_bytes: int | None = None
    limits: Limits = field(default_factory=Limits)
    # torch intra-op threads on CPU; None leaves torch's default.
    threads: int | None = None
    decode: DecodeConfig = field(default_factory=DecodeConfig)


@dataclass(eq=False, kw_only=True)
class _Sequence(TokenSequence):
    request: GenerationRequest
    stream: TextStream
    emit: Callable[[Chunk | Exception], None]
    arrival: float

    def expired(self, now: float) -> bool:
        return self.request.deadline is not None and now > self.request.deadline


class CloudEngine:
    """Implements the Engine protocol of core/engine_api.py with torch."""

    def __init__(self, config: CloudEngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        dtype = config.dtype or ("bfloat16" if self.device.type == "cuda" else "float32")
        if config.threads:
            torch.set_num_threads(config.threads)
        self.model = load_checkpoint(config.checkpoint, device=self.device, dtype=dtype)
        if config.decode.fuse_projections:
            self.model.fuse_projections()
        self.tokenizer = Tokenizer.from_dir(config.checkpoint)
        args = self.model.args
        self.kv_plan = plan_kv_cache(args, self.model.lm_head.weight.dtype, self.device,
                                     config.scheduler.slots, max_context=config.max_context,
                                     budget_bytes=config.kv_cache_bytes)
        self.max_context = self.kv_plan.context
        self.cache = self.model.new_cache(config.scheduler.slots, self.max_context)
        # Generation stops at any of them; eos_id is the one the edge runtime also knows.
        self.eos_id, self.eos_ids = self.tokenizer.eos_id, self.tokenizer.eos_ids
        meta = read_metadata(config.checkpoint)
        self._info = EngineInfo(
            served_by=ServedBy("cloud", config.node_id, checkpoint_version(config.checkpoint)),
            model_name=str(meta.get("name", Path(config.checkpoint).name)),
            max_context=self.max_context,
            max_new_tokens=min(config.limits.max_new_tokens, self.max_context - 1),
            precision=dtype.replace("float", "fp").replace("bfp16", "bf16"),
        )
        self.scheduler: Scheduler[_Sequence] = Scheduler(
            config.scheduler, cost=lambda s: len(s.prompt_ids)
        )
        self.batcher = ContinuousBatcher(
            BatchStepper(self.model, self.cache, config.decode), self.scheduler, self._append
        )
        self._jobs: deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = deque()
        self._thread: threading.Thread | None = None
        self._stopping = False
        log.info("cloud engine: %s on %s (%s), KV cache %s; the model's context is %d",
                 self._info.served_by.model_version, self.device, dtype,
                 self.kv_plan.describe(), args.max_seq_len)

    # ---- Engine protocol ----------------------------------------------------------------

    @property
    def info(self) -> EngineInfo:
        return self._info

    def load(self) -> EngineLoad:
        return EngineLoad(
            in_flight=len(self.scheduler.running),
            queue_depth=self.scheduler.queue_depth,
            slots=self.config.scheduler.slots,
            queue_capacity=self.config.scheduler.max_queue,
        )

    async def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cloud-engine", daemon=True)
            self._thread.start()

    async def stop(self, grace_s: float) -> None:
        self.scheduler.close()
        end = time.monotonic() + grace_s
        while not self.scheduler.idle and time.monotonic() < end:
            await asyncio.sleep(0.02)
        self._stopping = True
        self.scheduler.wakeup.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)
            self._thread = None
        # Past the grace period: whatever is still accepted ends loudly, never hangs.
        gone = Unavailable("the cloud engine stopped before this request finished; retry")
        for seq in list(self.scheduler.running.values()):
            self.batcher.finish(seq)
            seq.emit(gone)
        for seq in self.scheduler.drop_waiting(lambda _: False):
            seq.done = True
            seq.emit(gone)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        if self._thread is None or self._stopping:
            raise Unavailable("the cloud engine is not running")
        ids = self.tokenizer.encode_prompt(request.prompt, request.messages)
        if len(ids) + request.max_tokens > self.max_context:
            raise InvalidRequest(
                f"prompt is {len(ids)} tokens and max_tokens is {request.max_tokens}; together "
                f"they must fit the context of {self.max_context} tokens of the cloud tier: "
                "shorten the prompt or lower max_tokens"
            )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Chunk | Exception] = asyncio.Queue()

        def emit(item: Chunk | Exception) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        seq = _Sequence(
            request=request,
            prompt_ids=ids,
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p,
            seed=request.seed,
            stream=TextStream(self.tokenizer, request.stop),
            emit=emit,
            arrival=time.monotonic(),
        )
        self.scheduler.submit(seq)  # Overloaded / Unavailable propagate to the servicer
        try:
            while True:
                # Everything produced since the last chunk goes out as one: a reader that falls
                # behind (a busy event loop, a slow client) gets fewer, larger messages instead
                # of one gRPC message per token piling up.
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                chunks = [i for i in items if isinstance(i, Chunk)]
                if chunks:
                    yield merge_chunks(chunks)
                for item in items:
                    if isinstance(item, Exception):
                        raise item
                if chunks and chunks[-1].finish_reason is not None:
                    return
        finally:
            if not seq.done:
                # The client went away (or its deadline passed): free the slot at once.
                seq.cancelled = True
                self.scheduler.wakeup.set()

    async def score(
        self, prompt: str, messages: tuple[ChatMessage, ...] = ()
    ) -> ScoreResult:
        ids = self.tokenizer.encode_prompt(prompt, messages)
        if len(ids) > self.max_context:
            raise InvalidRequest(
                f"prompt is {len(ids)} tokens; the cloud tier scores at most {self.max_context} "
                "tokens (its context): shorten the prompt"
            )
        total, n = await self._call_in_engine(lambda: sequence_nll(self.model, ids))
        return ScoreResult(mean_loss=total / max(1, n), prompt_tokens=len(ids))

    # ---- engine thread ------------------------------------------------------------------

    async def _call_in_engine(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in the engine thread between steps (the thread owns the model)."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._jobs.append((fn, fut))
        self.scheduler.wakeup.set()
        return await asyncio.wrap_future(fut)

    def _run(self) -> None:
        with torch.inference_mode():
            if self.device.type == "cuda":
                # Capture (and compile) the batch-1 and batch-2 decode steps before serving:
                # a compile at the first request would stall it for tens of seconds. Requests
                # that arrive meanwhile wait in the queue.
                try:
                    self.batcher.stepper.graphs.warm_up([1, 2], self.max_context)
                except Exception:
                    log.exception("decode-step warm-up failed; buckets are captured on use")
            while not self._stopping:
                if self.scheduler.idle and not self._jobs:
                    self.scheduler.wakeup.wait(timeout=0.1)
                self.scheduler.wakeup.clear()
                try:
                    self._step()
                except Exception as e:  # a bug: fail the affected requests loudly, keep serving
                    log.exception("engine step failed")
                    for seq in list(self.scheduler.running.values()):
                        self.batcher.finish(seq)
                        seq.emit(TandemError(f"internal error in the cloud engine: {e}"))

    def _step(self) -> None:
        while self._jobs:
            fn, fut = self._jobs.popleft()
            try:
                fut.set_result(fn())
            except Exception as e:
                fut.set_exception(e)
        self._reap()
        self.batcher.step()

    def _reap(self) -> None:
        now = time.monotonic()
        for seq in list(self.scheduler.running.values()):
            if seq.cancelled:
                self.batcher.finish(seq)
            elif seq.expired(now):
                self.batcher.finish(seq)
                seq.emit(DeadlineExceeded("the request's deadline passed during generation"))
        for seq in self.scheduler.drop_waiting(lambda s: not s.cancelled and not s.expired(now)):
            seq.done = True
            if not seq.cancelled:
                seq.emit(DeadlineExceeded("the request's deadline passed while it was queued"))

    def _append(self, seq: _Sequence, token: int, now: float) -> bool:
        """Stream one new token (already in ``seq.generated``); True when the sequence ends."""
        finish: str | None = None
        ids: tuple[int, ...]
        if token in self.eos_ids:
            finish, text, ids = "eos", seq.stream.finish(), ()
        else:
            text, ids = seq.stream.push(token), (token,)
            if seq.stream.stopped:
                finish = "stop"
            elif (
                len(seq.generated) >= seq.request.max_tokens
                or len(seq.prompt_ids) + len(seq.generated) >= self.max_context
            ):
                finish = "length"
                text += seq.stream.finish()
        if finish is None:
            seq.emit(Chunk(text, ids))
            return False
        self.batcher.finish(seq)
        seq.emit(Chunk(
            text, ids, finish,
            Usage(len(seq.prompt_ids), len(seq.generated)),
            Timings(
                queue_ms=(seq.started - seq.arrival) * 1000,
                time_to_first_token_ms=(seq.first_token - seq.arrival) * 1000,
                total_ms=(now - seq.arrival) * 1000,
            ),
        ))
        return True
