"""The agent's side of ``tandem.v1.Control``: protobuf and grpc stay in this file.

Every call but Enroll carries the node credential (``authorization: Bearer <credential>``) and
a timeout; a failed call raises ``ControlError`` with the status name, so callers decide what
to retry without importing grpc.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import socket
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import grpc

from protos.tandem.v1 import control_pb2 as pb
from protos.tandem.v1.control_pb2_grpc import ControlStub

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = [
    # Artifact chunks are up to 1 MiB; leave room for the envelope.
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    # Reconnect soon after the cloud comes back, rather than after grpc's long default backoff.
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),
]
# Statuses after which the same call may well succeed later (the cloud restarting, a network
# blip, a stream cut mid-file).
RETRYABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "RESOURCE_EXHAUSTED",
                       "CANCELLED", "UNKNOWN", "INTERNAL"})


class ControlError(Exception):
    """A control call failed; ``code`` is the gRPC status name (e.g. "UNAUTHENTICATED")."""

    def __init__(self, method: str, code: str, details: str) -> None:
        super().__init__(f"{method}: {code}: {details}")
        self.code = code
        self.details = details

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE


@dataclass(frozen=True)
class Enrolled:
    node_id: str
    credential: str
    model_version: str
    heartbeat_interval_s: float | None
    manifest_public_key: str


@dataclass(frozen=True)
class SignedManifest:
    model_version: str
    manifest_json: bytes
    signature: bytes
    key_id: str


@dataclass(frozen=True)
class Outcome:
    """One version's outcomes over a report window (mirrors tandem.v1.VersionOutcomes)."""

    model_version: str
    requests: int
    errors: int
    latency_p50_ms: float
    latency_p99_ms: float


def _rpc_error(method: str, e: grpc.aio.AioRpcError) -> ControlError:
    return ControlError(method, e.code().name, e.details() or "")


def local_resources() -> pb.NodeResources:
    """This machine's cores, memory and CPU flags (an artifact variant may depend on them)."""
    memory = 0
    with contextlib.suppress(ValueError, OSError, AttributeError):  # not every OS has these
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    features: list[str] = []
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "")
        wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "fma")
        features = sorted(set(flags.split(":", 1)[-1].split()) & set(wanted))
    except OSError:  # not Linux: the cloud then picks the portable artifact
        features = [platform.machine()] if platform.machine() else []
    return pb.NodeResources(cpu_cores=os.cpu_count() or 0, memory_bytes=memory,
                            cpu_features=features)


class ControlClient:
    """An async client of one control service; ``async with`` closes its channel."""

    def __init__(self, address: str, credential: str = "", timeout_s: float = 10.0) -> None:
        self.address = address
        self.credential = credential
        self.timeout_s = timeout_s
        # Plaintext like every Tandem channel today; manifests are signed, so a man in the
        # middle can't swap a model, but the credential would show: put TLS in front in prod.
        self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = ControlStub(self._channel)

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def _auth(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.credential}"),)

    async def enroll(self, join_token: str, inference_address: str, node_id: str = "") -> Enrolled:
        """Spend ``join_token``; with ``node_id``, re-enroll that node (same id, new secret)."""
        req = pb.EnrollRequest(join_token=join_token, hostname=socket.gethostname() or "edge",
                               inference_address=inference_address,
                               resources=local_resources(), node_id=node_id)
        try:
            resp = await self._stub.Enroll(req, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            raise _rpc_error("Enroll", e) from None
        interval = resp.heartbeat_interval_ms / 1000 if resp.heartbeat_interval_ms > 0 else None
        return Enrolled(resp.node_id, resp.node_credential, resp.model_version, interval,
                        resp.manifest_public_key)

    async def heartbeat(
        self, node_id: str, model_version: str, loading_version: str, in_flight: int,
        queue_depth: int, tokens_per_second: float, healthy: bool,
    ) -> tuple[str, float | None]:
        """Report state; returns the version to serve ("" for none) and the next interval."""
        req = pb.HeartbeatRequest(
            node_id=node_id, model_version=model_version, loading_version=loading_version,
            load=pb.NodeLoad(in_flight=in_flight, queue_depth=queue_depth,
                             tokens_per_second=tokens_per_second),
            healthy=healthy)
        try:
            resp = await self._stub.Heartbeat(req, timeout=self.timeout_s, metadata=self._auth())
        except grpc.aio.AioRpcError as e:
            raise _rpc_error("Heartbeat", e) from None
        interval = resp.heartbeat_interval_ms / 1000 if resp.heartbeat_interval_ms > 0 else None
        return resp.desired_model_version, interval

    async def get_manifest(self, version: str) -> SignedManifest:
        try:
            resp = await self._stub.GetManifest(pb.GetManifestRequest(model_version=version),
                                                timeout=self.timeout_s, metadata=self._auth())
        except grpc.aio.AioRpcError as e:
            raise _rpc_error("GetManifest", e) from None
        return SignedManifest(resp.model_version, resp.manifest_json, resp.signature, resp.key_id)

    async def fetch(
        self, version: str, path: str, offset: int
    ) -> AsyncGenerator[tuple[int, bytes, int], None]:
        """``(offset, data, total_size)`` chunks of one file from ``offset``.

        No overall deadline (a large file on a slow link takes what it takes); a stalled
        stream is cut by the server or by the caller cancelling.
        """
        call = self._stub.FetchArtifact(
            pb.FetchArtifactRequest(model_version=version, path=path, offset=offset),
            metadata=self._auth())
        try:
            async for chunk in call:
                yield chunk.offset, chunk.data, chunk.total_size
        except grpc.aio.AioRpcError as e:
            raise _rpc_error("FetchArtifact", e) from None
        finally:
            call.cancel()  # a caller that stops early must not leave the stream open

    async def report(self, node_id: str, window_s: float, outcomes: list[Outcome]) -> None:
        req = pb.OutcomeReport(node_id=node_id, window_s=window_s, outcomes=[
            pb.VersionOutcomes(model_version=o.model_version, requests=o.requests,
                               errors=o.errors, latency_p50_ms=o.latency_p50_ms,
                               latency_p99_ms=o.latency_p99_ms)
            for o in outcomes])
        try:
            await self._stub.ReportOutcomes(req, timeout=self.timeout_s, metadata=self._auth())
        except grpc.aio.AioRpcError as e:
            raise _rpc_error("ReportOutcomes", e) from None
