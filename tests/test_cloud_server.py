"""The cloud tier over real gRPC: unary and streamed calls, status codes, health and drain."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloud.engine import CloudEngineConfig
from cloud.scheduler import SchedulerConfig
from cloud.server import CloudServer, CloudServerConfig, start_cloud_server
from core.grpc_server import ServerConfig
from model.demo import DEMO_DIR
from protos.tandem.v1 import inference_pb2 as pb
from protos.tandem.v1 import inference_pb2_grpc


@pytest.fixture
async def cloud():
    server = await start_cloud_server(CloudServerConfig(
        engine=CloudEngineConfig(checkpoint=DEMO_DIR / "cloud",
                                 scheduler=SchedulerConfig(slots=2, max_queue=2)),
        server=ServerConfig(port=0, grace_s=5.0),
    ))
    channel = grpc.aio.insecure_channel(server.address)
    try:
        yield server, inference_pb2_grpc.InferenceStub(channel), channel
    finally:
        await channel.close()
        await server.stop(1.0)


async def test_unary_and_stream_agree(cloud: tuple[CloudServer, object, object]) -> None:
    server, stub, _ = cloud
    req = pb.GenerateRequest(prompt="Return a new list", max_tokens=24, temperature=0.0)
    call = stub.Generate(req, timeout=30)
    resp = await call
    assert resp.text and resp.finish_reason in (pb.FINISH_REASON_EOS, pb.FINISH_REASON_LENGTH)
    assert resp.served_by.tier == pb.TIER_CLOUD and resp.served_by.node_id == "cloud-0"
    assert resp.served_by.model_version == server.engine.info.served_by.model_version
    assert resp.usage.prompt_tokens > 0 and resp.usage.total_tokens == (
        resp.usage.prompt_tokens + resp.usage.completion_tokens)
    assert resp.timings.total_ms >= resp.timings.time_to_first_token_ms > 0
    trailers = dict(await call.trailing_metadata())
    assert trailers["tandem-slots"] == "2" and "tandem-in-flight" in trailers

    chunks = [c async for c in stub.GenerateStream(req, timeout=30)]
    assert "".join(c.text for c in chunks) == resp.text
    assert chunks[0].served_by.tier == pb.TIER_CLOUD
    assert chunks[-1].finish_reason == resp.finish_reason
    assert [t for c in chunks for t in c.token_ids] == list(resp.token_ids)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt": ""}, "prompt must be non-empty"),
        ({"max_tokens": 0}, "max_tokens must be 1..512"),
        ({"max_tokens": 100_000}, "max_tokens must be 1..512"),
        ({"temperature": -1.0}, "temperature must be in [0, 10]"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"prompt": "word " * 600}, "fit the context"),
        ({"prompt": "x" * 40_000}, "limit is 32768 bytes"),
    ],
)
async def test_invalid_requests(cloud, fields: dict, message: str) -> None:
    _, stub, _ = cloud
    req = pb.GenerateRequest(**({"prompt": "hello"} | fields))
    for call in (stub.Generate(req, timeout=10), stub.GenerateStream(req, timeout=10)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            if isinstance(call, grpc.aio.UnaryStreamCall):
                [c async for c in call]
            else:
                await call
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in err.value.details()


async def test_non_utf8_prompt_is_invalid_argument(cloud) -> None:
    _, _, channel = cloud
    raw = channel.unary_unary("/tandem.v1.Inference/Generate")
    # Field 1 (prompt), wire type 2, length 2, bytes that are not UTF-8.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw(b"\x0a\x02\xff\xfe", timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in err.value.details()


async def test_overload_is_resource_exhausted_with_retry_hint(cloud) -> None:
    _, stub, _ = cloud
    req = pb.GenerateRequest(prompt="asyncio event loop", max_tokens=400, temperature=1.0)
    calls = [stub.GenerateStream(req, timeout=30) for _ in range(6)]
    outcomes = await asyncio.gather(*(c.read() for c in calls), return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert refused and all(o.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for o in refused)
    hint = dict(refused[0].trailing_metadata() or ())
    assert int(hint["retry-after-ms"]) > 0
    for c in calls:
        c.cancel()


async def test_health_and_graceful_drain(cloud) -> None:
    server, stub, channel = cloud
    health = health_pb2_grpc.HealthStub(channel)
    check = await health.Check(health_pb2.HealthCheckRequest(service="tandem.v1.Inference"))
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    stream = stub.GenerateStream(
        pb.GenerateRequest(prompt="The json module", max_tokens=60, temperature=0.0), timeout=30
    )
    await stream.read()  # in flight when the drain starts
    stopping = asyncio.ensure_future(server.stop(10.0))
    last = await stream.read()  # the accepted stream still completes
    while (chunk := await stream.read()) is not grpc.aio.EOF:
        last = chunk
    assert last.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    assert await stream.code() == grpc.StatusCode.OK
    await stopping
    assert server.engine.load().in_flight == 0
