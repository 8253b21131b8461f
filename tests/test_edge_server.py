"""The edge node over real gRPC: a grpc.aio server on port 0 serving the shipped demo edge model,
exported as int4 once per session (``demo_edge_int4`` in conftest.py).

The demo model decodes thousands of tokens a second, so tests that need a sequence to hold its
slot (overload, cancel, deadline, drain) pace the runtime's token stream instead of racing it.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from core.engine_servicer import IN_FLIGHT_KEY, QUEUE_DEPTH_KEY
from core.errors import DeadlineExceeded, Unavailable
from core.grpc_server import INFERENCE_SERVICE, RETRY_AFTER_KEY, ServerConfig
from core.request import GenerationRequest
from edge.config import EdgeEngineConfig
from edge.engine import EdgeEngine
from edge.runtime import EdgeRuntime
from edge.server import EdgeServer, EdgeServerConfig, start_edge_server
from model.manifest import CALIBRATION_FILE, build_manifest, read_manifest, write_manifest
from model.tokenizer import Tokenizer
from protos.tandem.v1 import inference_pb2 as pb
from protos.tandem.v1.inference_pb2_grpc import InferenceStub
from tandem.commands import edge_cmd

NODE_ID = "edge-test"
PROMPT = "Return the number of"  # greedy runs on for hundreds of tokens without EOS
EASY = "Return a new list containing all items from the iterable in ascending order."
GIBBERISH = "zq xv 9#@ plk qq zzz ~~ 77 wxq jj ## kk"
TIMEOUT = 30.0

Served = tuple[EdgeServer, InferenceStub, grpc.aio.Channel]


@pytest.fixture(scope="module")
def artifact(demo_edge_int4: Path) -> Path:
    """The session's shared export: read only (copy it to change files)."""
    return demo_edge_int4


@pytest.fixture(scope="module")
def reference(artifact: Path) -> tuple[EdgeRuntime, Tokenizer]:
    """The artifact loaded directly: what the server must agree with."""
    return EdgeRuntime.load(artifact), Tokenizer.from_dir(artifact)


@asynccontextmanager
async def serving(artifact: Path, **engine: Any) -> AsyncIterator[Served]:
    server = await start_edge_server(EdgeServerConfig(
        engine=EdgeEngineConfig(artifact_dir=artifact, node_id=NODE_ID, **engine),
        server=ServerConfig(port=0, grace_s=5.0),
    ))
    channel = grpc.aio.insecure_channel(server.address)
    try:
        yield server, InferenceStub(channel), channel
    finally:
        await channel.close()
        await server.stop(1.0)


@pytest.fixture
async def edge(artifact: Path) -> AsyncIterator[Served]:
    async with serving(artifact) as served:
        yield served


class Pace:
    """Slows the engine's runtime to one token per ``per_token_s`` and watches its streams."""

    def __init__(self, engine: EdgeEngine, per_token_s: float, mp: pytest.MonkeyPatch) -> None:
        runtime = engine.runtime
        assert runtime is not None
        original = runtime.generate
        self.produced = 0
        self.closed = threading.Event()  # set when a decode loop lets go of its token stream

        def generate(*args: Any, **kwargs: Any) -> Iterator[int]:
            try:
                for token in original(*args, **kwargs):
                    time.sleep(per_token_s)
                    self.produced += 1
                    yield token
            finally:
                self.closed.set()

        mp.setattr(runtime, "generate", generate)


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll ``condition`` (never a fixed sleep) until it holds."""
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, "condition did not hold in time"
        await asyncio.sleep(0.005)


def greedy(prompt: str = PROMPT, **fields: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, temperature=0.0, **({"max_tokens": 24} | fields))


# --- generation --------------------------------------------------------------------------------


async def test_unary_generate_matches_the_runtime_and_says_who_served_it(
    edge: Served, reference: tuple[EdgeRuntime, Tokenizer]
) -> None:
    _, stub, _ = edge
    runtime, tokenizer = reference
    call = stub.Generate(greedy(request_id="req-1"), timeout=TIMEOUT)
    resp = await call
    # BOS first, as the model was trained; greedy decoding is the runtime's own.
    expected = list(runtime.generate(tokenizer.encode(PROMPT), 24))
    assert list(resp.token_ids) == expected
    assert resp.text == tokenizer.decode(expected) and resp.text
    assert resp.finish_reason == pb.FINISH_REASON_LENGTH
    assert resp.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert resp.usage.completion_tokens == 24
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 24
    assert resp.served_by.tier == pb.TIER_EDGE and resp.served_by.node_id == NODE_ID
    assert resp.served_by.model_version == runtime.model_version
    assert resp.request_id == "req-1"
    t = resp.timings
    assert 0 <= t.queue_ms <= t.time_to_first_token_ms <= t.total_ms and t.total_ms > 0
    trailers = dict(await call.trailing_metadata())
    assert trailers[IN_FLIGHT_KEY] == "0" and trailers[QUEUE_DEPTH_KEY] == "0"

    info = await stub.Info(pb.InfoRequest(), timeout=TIMEOUT)
    assert info.max_context_tokens == runtime.max_context and info.precision == "int4"
    assert info.served_by.model_version == runtime.model_version


async def test_stream_concatenates_to_the_unary_text(edge: Served) -> None:
    _, stub, _ = edge
    req = greedy(max_tokens=64)
    resp = await stub.Generate(req, timeout=TIMEOUT)
    call = stub.GenerateStream(req, timeout=TIMEOUT)
    chunks = [c async for c in call]
    # How many chunks depends on timing (tokens produced while the reader is behind travel
    # together); that the stream is incremental is shown by the cancel and drain tests.
    assert "".join(c.text for c in chunks) == resp.text
    assert [t for c in chunks for t in c.token_ids] == list(resp.token_ids)
    assert chunks[0].served_by.tier == pb.TIER_EDGE
    last = chunks[-1]
    assert last.finish_reason == resp.finish_reason == pb.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == 64 and last.timings.total_ms > 0
    assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    trailers = dict(await call.trailing_metadata())
    assert IN_FLIGHT_KEY in trailers and QUEUE_DEPTH_KEY in trailers


async def test_stop_sequence_ends_generation_without_showing_it(edge: Served) -> None:
    _, stub, _ = edge
    full = (await stub.Generate(greedy(max_tokens=64), timeout=TIMEOUT)).text
    stop = full[12:16]  # a stop string well inside the greedy text
    expected = full[: full.index(stop)]
    resp = await stub.Generate(greedy(max_tokens=64, stop=[stop, "never-there"]), timeout=TIMEOUT)
    assert resp.finish_reason == pb.FINISH_REASON_STOP
    assert resp.text == expected and stop not in resp.text
    assert resp.usage.completion_tokens < 64

    chunks = [c async for c in stub.GenerateStream(greedy(max_tokens=64, stop=[stop]))]
    assert "".join(c.text for c in chunks) == expected
    assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP


async def test_eos_ends_with_finish_reason_eos(
    edge: Served, reference: tuple[EdgeRuntime, Tokenizer]
) -> None:
    _, stub, _ = edge
    runtime, tokenizer = reference
    expected = list(runtime.generate(tokenizer.encode(EASY), 200))
    assert len(expected) < 200, "the reference should end with EOS"
    resp = await stub.Generate(greedy(EASY, max_tokens=200), timeout=TIMEOUT)
    assert resp.finish_reason == pb.FINISH_REASON_EOS
    assert list(resp.token_ids) == expected


async def test_sampling_parameters_reach_the_runtime(edge: Served) -> None:
    _, stub, _ = edge

    async def sample(**fields: Any) -> list[int]:
        req = pb.GenerateRequest(prompt=PROMPT, max_tokens=32, temperature=1.0, **fields)
        return list((await stub.Generate(req, timeout=TIMEOUT)).token_ids)

    greedy_ids = list((await stub.Generate(greedy(max_tokens=32), timeout=TIMEOUT)).token_ids)
    seeded = await sample(seed=7)
    assert seeded == await sample(seed=7)  # a fixed seed is reproducible
    assert seeded != await sample(seed=8)
    assert await sample(top_k=1) == greedy_ids  # top_k 1 is greedy whatever the temperature
    assert await sample(seed=7, top_p=0.01) == greedy_ids  # a nucleus of one token


# --- invalid input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt": ""}, "prompt must be non-empty"),
        ({"prompt": "   "}, "prompt must be non-empty"),
        ({"max_tokens": 0}, "max_tokens must be 1..512, got 0"),
        ({"max_tokens": 100_000}, "max_tokens must be 1..512, got 100000"),
        ({"temperature": -1.0}, "temperature must be in [0, 10]"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"prompt": "word " * 600}, "shorten the prompt"),
        ({"max_tokens": 510}, "lower max_tokens to at most"),
    ],
)
async def test_invalid_requests_are_invalid_argument(
    edge: Served, fields: dict[str, Any], message: str
) -> None:
    _, stub, _ = edge
    req = pb.GenerateRequest(**({"prompt": PROMPT} | fields))
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await stub.Generate(req, timeout=TIMEOUT)
    with pytest.raises(grpc.aio.AioRpcError) as stream:
        [c async for c in stub.GenerateStream(req, timeout=TIMEOUT)]
    for err in (unary.value, stream.value):
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in (err.details() or "")


async def test_non_utf8_prompt_is_invalid_argument(edge: Served) -> None:
    _, _, channel = edge
    raw = channel.unary_unary(
        f"/{INFERENCE_SERVICE}/Generate", request_serializer=None, response_deserializer=None
    )
    # Field 1 (prompt), wire type 2 (length-delimited), 2 bytes that are not UTF-8.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw(b"\x0a\x02\xff\xfe", timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in (err.value.details() or "")


# --- scoring -----------------------------------------------------------------------------------


async def test_score_is_the_runtime_loss_and_easy_beats_gibberish(
    edge: Served, reference: tuple[EdgeRuntime, Tokenizer]
) -> None:
    _, stub, _ = edge
    runtime, tokenizer = reference
    easy = await stub.Score(pb.ScoreRequest(prompt=EASY), timeout=TIMEOUT)
    hard = await stub.Score(pb.ScoreRequest(prompt=GIBBERISH), timeout=TIMEOUT)
    assert math.isfinite(easy.mean_loss) and easy.mean_loss > 0
    assert easy.prompt_tokens == len(tokenizer.encode(EASY))
    assert easy.mean_loss == pytest.approx(runtime.score(tokenizer.encode(EASY)), rel=1e-5)
    assert easy.mean_loss < hard.mean_loss
    assert easy.served_by.tier == pb.TIER_EDGE
    assert not easy.HasField("difficulty_threshold")  # uncalibrated: the router's applies

    for prompt, message in (("", "non-empty"), ("word " * 600, "shorten the prompt")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Score(pb.ScoreRequest(prompt=prompt), timeout=TIMEOUT)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in (err.value.details() or "")


# --- load, cancellation, deadlines -------------------------------------------------------------


async def test_full_queue_is_refused_at_once_with_a_retry_hint(
    artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(artifact, max_concurrency=1, max_queue=1) as (server, stub, _):
        engine = server.engine
        pace = Pace(engine, 0.02, monkeypatch)
        long = greedy(max_tokens=400)
        running = stub.GenerateStream(long, timeout=TIMEOUT)
        await running.read()
        queued = stub.GenerateStream(long, timeout=TIMEOUT)
        await until(lambda: engine.load().queue_depth == 1)
        assert engine.load().in_flight == 1 and engine.load().saturated

        for extra in (stub.GenerateStream(long, timeout=TIMEOUT), stub.Generate(long)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                if isinstance(extra, grpc.aio.UnaryStreamCall):
                    await extra.read()
                else:
                    await extra
            # Refused, not queued: the answer came while the slot and the queue were still held
            # by the two before it (the paced one runs 400 tokens).
            assert pace.produced < 400 and not pace.closed.is_set()
            assert engine.load().in_flight == 1 and engine.load().queue_depth == 1
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "at capacity" in (err.value.details() or "")
            trailers = dict(err.value.trailing_metadata() or ())
            assert int(trailers[RETRY_AFTER_KEY]) > 0
            assert trailers[IN_FLIGHT_KEY] == "1" and trailers[QUEUE_DEPTH_KEY] == "1"

        running.cancel()
        queued.cancel()
        await until(lambda: engine.load().in_flight == 0 and engine.load().queue_depth == 0)

        # A queued request whose deadline passes gives up its place in line.
        blocker = stub.GenerateStream(long, timeout=TIMEOUT)
        await blocker.read()
        late = GenerationRequest(prompt=PROMPT, max_tokens=4, deadline=time.monotonic() + 0.1)
        with pytest.raises(DeadlineExceeded, match="waited for a free slot"):
            [c async for c in engine.generate(late)]
        assert engine.load().queue_depth == 0
        blocker.cancel()


async def test_client_cancel_frees_the_slot_and_stops_decoding(
    edge: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, stub, _ = edge
    pace = Pace(server.engine, 0.01, monkeypatch)
    call = stub.GenerateStream(greedy(max_tokens=400), timeout=TIMEOUT)
    await call.read()
    assert server.engine.load().in_flight == 1
    call.cancel()
    await until(lambda: server.engine.load().in_flight == 0)
    await until(pace.closed.is_set)
    assert pace.produced < 400  # the worker stopped at the next token, not at max_tokens


async def test_deadline_stops_generation(edge: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    server, stub, _ = edge
    engine = server.engine
    pace = Pace(engine, 0.01, monkeypatch)
    req = GenerationRequest(
        prompt=PROMPT, max_tokens=400, temperature=0.0, deadline=time.monotonic() + 0.2
    )
    chunks = []
    with pytest.raises(DeadlineExceeded, match="during generation"):
        async for chunk in engine.generate(req):
            chunks.append(chunk)
    assert chunks and engine.load().in_flight == 0
    await until(pace.closed.is_set)
    assert pace.produced < 400

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Generate(greedy(max_tokens=400), timeout=0.2)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await until(lambda: engine.load().in_flight == 0)


# --- lifecycle ---------------------------------------------------------------------------------


async def test_health_serving_then_drain_finishes_in_flight_work(
    edge: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, stub, channel = edge
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", INFERENCE_SERVICE):
        resp = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING

    watch = health.Watch(health_pb2.HealthCheckRequest(service=INFERENCE_SERVICE))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    Pace(server.engine, 0.01, monkeypatch)
    stream = stub.GenerateStream(greedy(max_tokens=40), timeout=TIMEOUT)
    first = await stream.read()
    stopping = asyncio.create_task(server.stop(5.0))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()
    with pytest.raises(grpc.aio.AioRpcError) as refused:  # new work goes elsewhere
        await stub.Generate(greedy(max_tokens=2), timeout=TIMEOUT)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    chunks = [first]
    while (chunk := await stream.read()) is not grpc.aio.EOF:  # the accepted stream finishes
        chunks.append(chunk)
    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert sum(len(c.token_ids) for c in chunks) == 40
    await asyncio.wait_for(stopping, TIMEOUT)
    assert server.engine.load().in_flight == 0
    with pytest.raises(Unavailable, match="draining"):
        [c async for c in server.engine.generate(GenerationRequest(prompt=PROMPT, max_tokens=2))]


async def test_engine_is_unavailable_until_started(artifact: Path) -> None:
    engine = EdgeEngine(EdgeEngineConfig(artifact_dir=artifact))
    assert engine.info.served_by.tier == "edge"  # known before the model loads
    assert engine.load().in_flight == 0 and engine.load().slots == 4
    with pytest.raises(Unavailable, match="loading"):
        [c async for c in engine.generate(GenerationRequest(prompt=PROMPT, max_tokens=2))]
    with pytest.raises(Unavailable, match="loading"):
        await engine.score(PROMPT)


def test_edge_path_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import sys, edge.engine, edge.server, tandem.commands.edge_cmd; "
        "bad = {'torch', 'transformers'} & set(sys.modules); "
        "sys.exit(f'the edge path imported {bad}' if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_cli_serve_parses_and_refuses_a_missing_artifact(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    edge_cmd.register(parser.add_subparsers(dest="group", required=True))
    args = parser.parse_args([
        "edge", "serve", "--artifact", str(tmp_path / "missing"), "--port", "0",
        "--max-concurrency", "2", "--max-queue", "3", "--threads", "1", "--node-id", "e-9",
    ])
    assert (args.max_concurrency, args.max_queue, args.threads, args.node_id) == (2, 3, 1, "e-9")
    with pytest.raises(FileNotFoundError, match="--export-from"):
        args.func(args)


async def test_a_calibrated_artifact_reports_its_difficulty_threshold(
    artifact: Path, tmp_path: Path
) -> None:
    calibrated = tmp_path / "calibrated"
    shutil.copytree(artifact, calibrated)
    (calibrated / CALIBRATION_FILE).write_text('{"difficulty_threshold": 4.37}')
    m = read_manifest(artifact)
    write_manifest(calibrated, build_manifest(
        calibrated, model_version=m.model_version + "-cal", base_version=m.base_version,
        quantization=m.quantization, created_by="tests"))
    async with serving(calibrated) as (_, stub, _):
        score = await stub.Score(pb.ScoreRequest(prompt=EASY), timeout=TIMEOUT)
    assert score.HasField("difficulty_threshold")
    assert score.difficulty_threshold == pytest.approx(4.37)
