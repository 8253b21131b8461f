"""Continuous batching in the cloud engine: parity with the reference path, admission, cancel."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from cloud.engine import CloudEngine, CloudEngineConfig
from cloud.scheduler import SchedulerConfig
from core.engine_api import Chunk
from core.errors import DeadlineExceeded, InvalidRequest, Overloaded, Unavailable
from core.request import GenerationRequest, Limits, validate
from model.demo import DEMO_DIR
from model.generate import generate_tokens

PROMPTS = [
    "The json module",
    "Return a new list",
    "socket.socket(family",
    "os.path.join joins one or more path components",
    "asyncio event loop",
    "Decimal fixed point and floating point arithmetic",
]


def _req(prompt: str, n: int = 24, **kw: object) -> GenerationRequest:
    return validate(prompt=prompt, limits=Limits(), max_tokens=n, **({"temperature": 0.0} | kw))


async def _collect(stream: AsyncIterator[Chunk]) -> tuple[list[int], str, Chunk]:
    ids: list[int] = []
    text = ""
    last = None
    async for chunk in stream:
        ids += chunk.token_ids
        text += chunk.text
        last = chunk
    assert last is not None
    return ids, text, last


async def _until(cond, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(0.01)


@pytest.fixture
async def engine():
    eng = CloudEngine(CloudEngineConfig(
        checkpoint=DEMO_DIR / "cloud", scheduler=SchedulerConfig(slots=3, max_queue=4)
    ))
    await eng.start()
    try:
        yield eng
    finally:
        await eng.stop(1.0)


async def test_batched_greedy_equals_reference(engine: CloudEngine) -> None:
    """More requests than slots, arriving while others decode: every output is unchanged."""

    async def one(i: int, prompt: str) -> tuple[list[int], str, Chunk]:
        await asyncio.sleep(0.03 * i)
        return await _collect(engine.generate(_req(prompt, 16 + 4 * i)))

    results = await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))
    for i, (prompt, (ids, text, last)) in enumerate(zip(PROMPTS, results, strict=True)):
        ref = list(generate_tokens(engine.model, engine.tokenizer.encode(prompt), 16 + 4 * i,
                                   eos_id=engine.eos_id))
        assert ids == [t for t in ref if t != engine.eos_id], prompt
        assert text == engine.tokenizer.decode(ids)
        assert last.finish_reason == ("eos" if ref[-1] == engine.eos_id else "length")
        assert last.usage is not None and last.usage.completion_tokens == len(ref)
        assert last.timings is not None
        assert 0 <= last.timings.queue_ms <= last.timings.time_to_first_token_ms
        assert last.timings.time_to_first_token_ms <= last.timings.total_ms


async def test_seeded_sampling_is_reproducible_in_any_batch(engine: CloudEngine) -> None:
    req = _req(PROMPTS[0], 20, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    alone = await _collect(engine.generate(req))
    crowd = await asyncio.gather(
        _collect(engine.generate(req)),
        *(_collect(engine.generate(_req(p, 20, temperature=1.0))) for p in PROMPTS[1:3]),
    )
    assert crowd[0][0] == alone[0]
    other_seed = await _collect(engine.generate(_req(PROMPTS[0], 20, temperature=0.9, seed=99)))
    assert other_seed[0] != alone[0]


async def test_stop_sequence_ends_generation_without_showing_it(engine: CloudEngine) -> None:
    _, full, _ = await _collect(engine.generate(_req(PROMPTS[1], 40)))
    stop = full[10:14]
    assert stop.strip(), f"need a visible stop string, got {full!r}"
    _, text, last = await _collect(engine.generate(_req(PROMPTS[1], 40, stop=(stop,))))
    assert last.finish_reason == "stop"
    assert text == full[: full.index(stop)]


async def test_full_queue_is_refused_at_once_with_a_hint(engine: CloudEngine) -> None:
    """3 slots + 4 queued: of 9 requests submitted in one go, the overflow is refused."""
    streams = [engine.generate(_req(PROMPTS[i % len(PROMPTS)], 200)) for i in range(9)]
    order: list[str] = []  # "refused" or "token", as each first __anext__ came back

    async def first(stream: AsyncIterator[Chunk]) -> Chunk:
        try:
            chunk = await stream.__anext__()
        except Overloaded:
            order.append("refused")
            raise
        order.append("token")
        return chunk

    # Each first __anext__ submits without yielding to other tasks, so all 9 arrive together.
    firsts = await asyncio.gather(*(first(s) for s in streams), return_exceptions=True)
    refused = [r for r in firsts if isinstance(r, Overloaded)]
    assert len(refused) >= 2, firsts
    assert all(r.retry_after_s and r.retry_after_s > 0 for r in refused)
    assert not [r for r in firsts if isinstance(r, Exception) and not isinstance(r, Overloaded)]
    # At once: every refusal came back before any admitted request had its first token.
    assert order == ["refused"] * len(refused) + ["token"] * (9 - len(refused)), order
    for s in streams:
        await s.aclose()
    await _until(lambda: engine.load().in_flight == 0 and engine.load().queue_depth == 0)


async def test_cancel_frees_the_slot(engine: CloudEngine) -> None:
    stream = engine.generate(_req(PROMPTS[3], 400))
    await stream.__anext__()
    assert engine.load().in_flight == 1
    await stream.aclose()  # what grpc does when the client cancels
    await _until(lambda: engine.load().in_flight == 0)


async def test_deadline_and_context_limits(engine: CloudEngine) -> None:
    past = GenerationRequest(prompt="x", max_tokens=5, temperature=0.0,
                             deadline=time.monotonic() - 1)
    with pytest.raises(DeadlineExceeded):
        await _collect(engine.generate(past))
    with pytest.raises(InvalidRequest, match="fit the context"):
        await _collect(engine.generate(_req("word " * 400, 300)))


async def test_score_ranks_corpus_text_below_gibberish(engine: CloudEngine) -> None:
    easy = await engine.score("Return a new list containing all items from the iterable.")
    hard = await engine.score("zq xv 9#@ plk qq zzz ~~ 77 wxq")
    assert easy.prompt_tokens > 0 and easy.mean_loss < hard.mean_loss


async def test_stopped_engine_refuses_work() -> None:
    eng = CloudEngine(CloudEngineConfig(checkpoint=DEMO_DIR / "cloud"))
    await eng.start()
    await eng.stop(1.0)
    with pytest.raises(Unavailable):
        await _collect(eng.generate(_req(PROMPTS[0])))


async def test_stop_past_the_grace_period_fails_accepted_work_loudly() -> None:
    eng = CloudEngine(CloudEngineConfig(checkpoint=DEMO_DIR / "cloud"))
    await eng.start()
    # Hold the engine thread so the request is still accepted-but-unfinished at the stop.
    busy = asyncio.ensure_future(eng._call_in_engine(lambda: time.sleep(0.3)))
    stream = eng.generate(_req(PROMPTS[3], 400))
    first = asyncio.ensure_future(stream.__anext__())
    await _until(lambda: eng.load().queue_depth == 1 or first.done())
    await eng.stop(0.0)
    await busy
    with pytest.raises(Unavailable, match="stopped before this request finished"):
        await first
        async for _ in stream:
            pass
    assert eng.load().in_flight == 0 and eng.load().queue_depth == 0
