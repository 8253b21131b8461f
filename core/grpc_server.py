"""The gRPC shell every Tandem server runs in: an aio server, health, graceful drain, errors.

``build_server`` wires services and health but does not start (tests bind port 0 and read the
port back). ``abort`` is the one place a ``TandemError`` becomes a gRPC status, with a
``retry-after-ms`` trailer when the error carries a hint. Shutdown follows ARCHITECTURE.md:
health NOT_SERVING -> stop accepting -> drain in-flight work -> stop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from core.errors import TandemError
from protos.tandem.v1 import inference_pb2 as pb

log = logging.getLogger(__name__)

INFERENCE_SERVICE = "tandem.v1.Inference"
RETRY_AFTER_KEY = "retry-after-ms"

SERVER_OPTIONS: list[tuple[str, Any]] = [
    # A stale server must never share a port with a new one (tests bind port 0 repeatedly).
    ("grpc.so_reuseport", 0),
    # Prompts are bounded by Limits (32 KiB); artifact chunks are 1 MiB. 8 MiB leaves room.
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    # Let idle client connections (routers) keep-alive ping every 10 s without being refused.
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Connections end after 5 minutes (streams under way get 10 more), so clients resolve
    # DNS again: routers find the cloud replicas an autoscaler added behind a headless Service.
    ("grpc.max_connection_age_ms", 300_000),
    ("grpc.max_connection_age_grace_ms", 600_000),
]


@dataclass(frozen=True)
class ServerConfig:
    """Where a server listens and how long it drains on shutdown."""

    host: str = "127.0.0.1"
    port: int = 0
    grace_s: float = 10.0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Undecodable:
    """A request whose bytes did not parse (e.g. a string field that is not UTF-8)."""

    reason: str


def lenient(message_cls: Any) -> Callable[[bytes], Any]:
    """A request deserializer that returns ``Undecodable`` instead of raising: grpc would
    answer an undecodable request with INTERNAL; we owe the caller INVALID_ARGUMENT."""
    def parse(data: bytes) -> Any:
        try:
            return message_cls.FromString(data)
        except DecodeError as e:
            return Undecodable(str(e))

    return parse


def add_inference_servicer(server: grpc.aio.Server, servicer: Any) -> None:
    """Register a tandem.v1.Inference implementation with lenient request parsing."""
    ser = lambda m: m.SerializeToString()  # noqa: E731
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(
            servicer.Generate, lenient(pb.GenerateRequest), ser),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            servicer.GenerateStream, lenient(pb.GenerateRequest), ser),
        "Score": grpc.unary_unary_rpc_method_handler(
            servicer.Score, lenient(pb.ScoreRequest), ser),
        "Info": grpc.unary_unary_rpc_method_handler(
            servicer.Info, lenient(pb.InfoRequest), ser),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(INFERENCE_SERVICE, handlers),)
    )


def build_server(
    config: ServerConfig,
    register: Callable[[grpc.aio.Server], None],
    services: Sequence[str],
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> tuple[grpc.aio.Server, int, health_aio.HealthServicer]:
    """An unstarted server with ``register``'s services and health (NOT_SERVING until ready)."""
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=list(interceptors))
    register(server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    # grpc's servicer reports "" as SERVING from the start; nothing is ready before warm-up.
    # set() is async and this runs before the loop serves; the stubs omit the private map.
    for name in ("", *services):
        health._server_status[name] = (  # type: ignore[attr-defined]
            health_pb2.HealthCheckResponse.NOT_SERVING)
    port = server.add_insecure_port(config.address)
    if port == 0:
        raise OSError(f"could not bind {config.address}")
    return server, port, health


async def set_serving(health: health_aio.HealthServicer, services: Sequence[str]) -> None:
    for name in ("", *services):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)


async def set_not_serving(health: health_aio.HealthServicer, services: Sequence[str]) -> None:
    for name in ("", *services):
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)


def status_code(err: TandemError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, err.status, grpc.StatusCode.INTERNAL)


async def abort(
    context: grpc.aio.ServicerContext[Any, Any],
    err: TandemError,
    trailers: Sequence[tuple[str, str]] = (),
) -> NoReturn:
    """End the RPC with ``err``'s status, message and retry-after hint."""
    metadata = list(trailers)
    if err.retry_after_s is not None:
        metadata.append((RETRY_AFTER_KEY, str(max(1, round(err.retry_after_s * 1000)))))
    await context.abort(status_code(err), err.message, trailing_metadata=tuple(metadata))
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


async def drain_and_stop(
    server: grpc.aio.Server,
    health: health_aio.HealthServicer,
    grace_s: float,
    after_drain: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Graceful shutdown: NOT_SERVING, refuse new RPCs, let in-flight ones finish, stop."""
    await health.enter_graceful_shutdown()
    await server.stop(grace_s)
    if after_drain is not None:
        await after_drain()


async def wait_for_signal() -> None:
    """Return on SIGINT or SIGTERM (the CLI's way to run a server until Ctrl-C)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
