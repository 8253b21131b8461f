"""The control plane over real gRPC: a grpc.aio server on port 0 over a real SQLite database and
artifact store in a temporary directory, serving the shipped demo edge model exported as int4
once per session (``demo_edge_int4`` in conftest.py). Downloads use 64 KiB chunks so that a file
spans many and can be cut off halfway.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from control.config import ControlConfig
from control.publish import publish_model
from control.server import ControlServer, start_control_server
from control.servicer import CONTROL_SERVICE
from core.grpc_server import ServerConfig
from model.manifest import (
    MANIFEST_NAME,
    ArtifactIntegrityError,
    Manifest,
    read_manifest,
    verify_artifact,
)
from model.signing import SignatureError, public_key_id, verify_manifest
from protos.tandem.v1 import control_pb2 as pb
from protos.tandem.v1.control_pb2_grpc import ControlStub

CHUNK = 64 * 1024
ADDRESS = "127.0.0.1:50061"
Metadata = tuple[tuple[str, str], ...]


def auth(credential: str) -> Metadata:
    return (("authorization", f"Bearer {credential}"),)


@pytest.fixture(scope="module")
def artifact(demo_edge_int4: Path) -> Path:
    """The session's shared export: read only (copy it to change files)."""
    return demo_edge_int4


@dataclass
class Control:
    server: ControlServer
    stub: ControlStub
    channel: grpc.aio.Channel
    version: str

    async def enroll(self, node_id: str = "", token: str | None = None) -> pb.EnrollResponse:
        return await self.stub.Enroll(pb.EnrollRequest(
            join_token=token or self.server.create_join_token(), hostname="edge-host",
            inference_address=ADDRESS, node_id=node_id,
            resources=pb.NodeResources(cpu_cores=2, memory_bytes=4 << 30)))


async def start(data_dir: Path, artifact: Path | None = None) -> Control:
    server = await start_control_server(ControlConfig(
        data_dir=data_dir, server=ServerConfig(port=0, grace_s=2.0), heartbeat_interval_s=1.0,
        chunk_bytes=CHUNK))
    version = ""
    if artifact is not None:
        version = publish_model(server.data, artifact)[0].version
    channel = grpc.aio.insecure_channel(server.address)
    return Control(server, ControlStub(channel), channel, version)


async def stop(control: Control) -> None:
    await control.channel.close()
    await control.server.stop(1.0)


@pytest.fixture
async def control(tmp_path: Path, artifact: Path) -> AsyncIterator[Control]:
    running = await start(tmp_path / "control", artifact)
    try:
        yield running
    finally:
        await stop(running)


async def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value.code()


async def fetch(stub: ControlStub, credential: str, version: str, path: str, offset: int = 0,
                max_chunks: int | None = None) -> tuple[bytes, int]:
    """Bytes of ``path`` from ``offset`` (all, or the first ``max_chunks`` chunks) and its size."""
    call = stub.FetchArtifact(pb.FetchArtifactRequest(model_version=version, path=path,
                                                      offset=offset), metadata=auth(credential))
    data, total, chunks = b"", -1, 0
    async for chunk in call:
        assert chunk.offset == offset + len(data)  # contiguous, and says where it starts
        data, total, chunks = data + chunk.data, chunk.total_size, chunks + 1
        if max_chunks is not None and chunks == max_chunks:
            call.cancel()  # the connection "drops" mid-file
            break
    return data, total


async def download(control: Control, credential: str, version: str, dest: Path,
                   public_pem: str) -> Manifest:
    """What an edge node does: signed manifest, every file (the largest interrupted once and
    resumed), manifest.json beside them."""
    signed = await control.stub.GetManifest(pb.GetManifestRequest(model_version=version),
                                            metadata=auth(credential))
    verify_manifest(public_pem, signed.manifest_json, signed.signature, key_id=signed.key_id)
    manifest = Manifest.from_json_bytes(signed.manifest_json)
    largest = max(manifest.files, key=lambda f: f.size)
    for entry in manifest.files:
        part, total = b"", entry.size
        if entry is largest:
            part, total = await fetch(control.stub, credential, version, entry.path,
                                      max_chunks=3)
            assert len(part) == 3 * CHUNK < total
        rest, total = await fetch(control.stub, credential, version, entry.path, len(part))
        assert total == entry.size
        (dest / entry.path).parent.mkdir(parents=True, exist_ok=True)
        (dest / entry.path).write_bytes(part + rest)
    (dest / MANIFEST_NAME).write_bytes(signed.manifest_json)
    return manifest


# --- enrollment and authentication -------------------------------------------------------------


async def test_enroll_returns_identity_version_and_key(control: Control) -> None:
    reply = await control.enroll()
    assert reply.node_id and reply.node_credential.startswith("tdmn_")
    assert reply.model_version == control.version  # the first publish is the fleet's version
    assert reply.heartbeat_interval_ms == 1000
    assert public_key_id(reply.manifest_public_key) == control.server.data.key.key_id
    [node] = control.server.data.store.nodes()
    assert (node.node_id, node.inference_address, node.resources.cpu_cores) == (
        reply.node_id, ADDRESS, 2)


async def test_join_token_is_single_use_and_expires(control: Control) -> None:
    token = control.server.create_join_token()
    await control.enroll(token=token)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await control.enroll(token=token)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "already used" in (err.value.details() or "")
    short = control.server.create_join_token(0.05)
    await asyncio.sleep(0.1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await control.enroll(token=short)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "expired" in (err.value.details() or "")
    assert await code_of(control.enroll(token="tdmj_nope")) == grpc.StatusCode.UNAUTHENTICATED
    assert len(control.server.data.store.nodes()) == 1


async def test_reenroll_is_idempotent(control: Control) -> None:
    first = await control.enroll()
    again = await control.enroll(node_id=first.node_id)
    assert again.node_id == first.node_id and again.node_credential != first.node_credential
    beat = pb.HeartbeatRequest(node_id=first.node_id, healthy=True)
    assert await code_of(control.stub.Heartbeat(beat, metadata=auth(first.node_credential))) \
        == grpc.StatusCode.UNAUTHENTICATED
    await control.stub.Heartbeat(beat, metadata=auth(again.node_credential))
    assert len(control.server.data.store.nodes()) == 1


async def test_every_call_but_enroll_needs_a_credential(control: Control) -> None:
    reply = await control.enroll()
    other = await control.enroll()
    calls = {
        "Heartbeat": lambda md: control.stub.Heartbeat(
            pb.HeartbeatRequest(node_id=reply.node_id), metadata=md),
        "GetManifest": lambda md: control.stub.GetManifest(
            pb.GetManifestRequest(model_version=control.version), metadata=md),
        "FetchArtifact": lambda md: fetch_all(control.stub.FetchArtifact(
            pb.FetchArtifactRequest(model_version=control.version, path="tokenizer.json"),
            metadata=md)),
        "ReportOutcomes": lambda md: control.stub.ReportOutcomes(
            pb.OutcomeReport(node_id=reply.node_id, window_s=1.0), metadata=md),
    }
    bad = [None, (("authorization", "Bearer tdmn_" + "x" * 43),),
           (("authorization", f"Basic {reply.node_credential}"),)]
    for name, call in calls.items():
        for md in bad:
            assert await code_of(call(md)) == grpc.StatusCode.UNAUTHENTICATED, (name, md)
        await call(auth(reply.node_credential))
    # Another node's credential can't speak for this node.
    assert await code_of(calls["Heartbeat"](auth(other.node_credential))) \
        == grpc.StatusCode.PERMISSION_DENIED
    health = health_pb2_grpc.HealthStub(control.channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(service=CONTROL_SERVICE))
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    registry = control.server.registry
    assert registry.get_sample_value("tandem_control_requests_total", {
        "method": "Heartbeat", "status": "UNAUTHENTICATED"}) == len(bad)
    assert registry.get_sample_value("tandem_control_nodes") == 2


async def fetch_all(call: grpc.aio.UnaryStreamCall) -> list[pb.ArtifactChunk]:
    return [chunk async for chunk in call]


async def test_undecodable_request_is_invalid_argument(control: Control) -> None:
    enroll = control.channel.unary_unary(f"/{CONTROL_SERVICE}/Enroll")
    # Field 2 (hostname, a string) holding bytes that are not UTF-8.
    assert await code_of(enroll(b"\x12\x02\xff\xfe")) == grpc.StatusCode.INVALID_ARGUMENT


# --- heartbeats and outcomes -------------------------------------------------------------------


async def test_heartbeat_records_the_node_and_answers_the_desired_version(
        control: Control, artifact: Path) -> None:
    reply = await control.enroll()
    md = auth(reply.node_credential)
    answer = await control.stub.Heartbeat(pb.HeartbeatRequest(
        node_id=reply.node_id, model_version=control.version, healthy=True,
        load=pb.NodeLoad(in_flight=3, queue_depth=1, tokens_per_second=420.0)), metadata=md)
    assert answer.desired_model_version == control.version
    assert answer.heartbeat_interval_ms == 1000
    node = control.server.data.store.node(reply.node_id)
    assert (node.served_version, node.healthy, node.load.in_flight) == (control.version, True, 3)
    # A canary rollout targets this node: its next heartbeat learns the new version.
    store = control.server.data.store
    v2 = publish_model(control.server.data, artifact, model_version="demo-v2")[0].version
    store.start_rollout(v2, [reply.node_id], 0.2)
    answer = await control.stub.Heartbeat(pb.HeartbeatRequest(
        node_id=reply.node_id, model_version=control.version, loading_version=v2,
        healthy=True), metadata=md)
    assert answer.desired_model_version == v2
    bad = pb.HeartbeatRequest(node_id=reply.node_id, load=pb.NodeLoad(in_flight=-1))
    assert await code_of(control.stub.Heartbeat(bad, metadata=md)) \
        == grpc.StatusCode.INVALID_ARGUMENT


async def test_outcomes_are_stored_per_node_and_version(control: Control) -> None:
    reply = await control.enroll()
    md = auth(reply.node_credential)
    await control.stub.ReportOutcomes(pb.OutcomeReport(
        node_id=reply.node_id, window_s=30.0, outcomes=[
            pb.VersionOutcomes(model_version=control.version, requests=40, errors=1,
                               escalations=3, latency_p50_ms=12.0, latency_p99_ms=70.0)]),
        metadata=md)
    [window] = control.server.data.store.outcomes(version=control.version)
    assert (window.node_id, window.requests, window.errors, window.escalations) == (
        reply.node_id, 40, 1, 3)
    bad = pb.OutcomeReport(node_id=reply.node_id, window_s=30.0, outcomes=[
        pb.VersionOutcomes(model_version=control.version, requests=1, errors=5)])
    assert await code_of(control.stub.ReportOutcomes(bad, metadata=md)) \
        == grpc.StatusCode.INVALID_ARGUMENT


# --- signed manifests and downloads ------------------------------------------------------------


async def test_manifest_signature_verifies_and_fails_after_one_flipped_byte(
        control: Control, artifact: Path) -> None:
    reply = await control.enroll()
    md = auth(reply.node_credential)
    signed = await control.stub.GetManifest(
        pb.GetManifestRequest(model_version=control.version), metadata=md)
    assert signed.model_version == control.version
    assert signed.manifest_json == (artifact / MANIFEST_NAME).read_bytes()
    verify_manifest(reply.manifest_public_key, signed.manifest_json, signed.signature,
                    key_id=signed.key_id)
    flipped = bytearray(signed.manifest_json)
    flipped[len(flipped) // 2] ^= 0x01
    with pytest.raises(SignatureError):
        verify_manifest(reply.manifest_public_key, bytes(flipped), signed.signature)
    missing = control.stub.GetManifest(pb.GetManifestRequest(model_version="nope"), metadata=md)
    assert await code_of(missing) == grpc.StatusCode.NOT_FOUND
    empty = control.stub.GetManifest(pb.GetManifestRequest(), metadata=md)
    assert await code_of(empty) == grpc.StatusCode.INVALID_ARGUMENT


async def test_download_resumes_and_reassembles_the_artifact(
        control: Control, artifact: Path, tmp_path: Path) -> None:
    reply = await control.enroll()
    dest = tmp_path / "node" / control.version
    dest.mkdir(parents=True)
    manifest = await download(control, reply.node_credential, control.version, dest,
                              reply.manifest_public_key)
    verify_artifact(dest, read_manifest(dest))  # every size and sha256 matches
    for entry in manifest.files:
        assert hashlib.sha256((dest / entry.path).read_bytes()).hexdigest() == entry.sha256
        assert (dest / entry.path).read_bytes() == (artifact / entry.path).read_bytes()
    bytes_served = control.server.registry.get_sample_value(
        "tandem_control_artifact_bytes_total")
    assert bytes_served is not None and bytes_served >= manifest.total_size


async def test_a_truncated_or_tampered_download_is_detected(
        control: Control, tmp_path: Path) -> None:
    reply = await control.enroll()
    dest = tmp_path / "node"
    dest.mkdir()
    manifest = await download(control, reply.node_credential, control.version, dest,
                              reply.manifest_public_key)
    largest = max(manifest.files, key=lambda f: f.size)
    target = dest / largest.path
    good = target.read_bytes()
    target.write_bytes(good[: -1000])  # a download that stopped early
    with pytest.raises(ArtifactIntegrityError) as err:
        verify_artifact(dest, manifest)
    assert err.value.changed == (largest.path,)
    tampered = bytearray(good)
    tampered[len(good) // 3] ^= 0x01  # same size, one bit off
    target.write_bytes(bytes(tampered))
    with pytest.raises(ArtifactIntegrityError):
        verify_artifact(dest, manifest)


async def test_fetch_refusals_and_the_end_of_a_file(control: Control) -> None:
    reply = await control.enroll()
    md = auth(reply.node_credential)
    manifest = control.server.data.artifacts.manifest(control.version)
    size = next(f.size for f in manifest.files if f.path == "tokenizer.json")

    def call(path: str, offset: int = 0, version: str | None = None) -> object:
        return fetch_all(control.stub.FetchArtifact(pb.FetchArtifactRequest(
            model_version=version or control.version, path=path, offset=offset), metadata=md))

    assert await code_of(call("../control.db")) == grpc.StatusCode.INVALID_ARGUMENT
    assert await code_of(call("manifest.json")) == grpc.StatusCode.INVALID_ARGUMENT
    assert await code_of(call("tokenizer.json", -1)) == grpc.StatusCode.INVALID_ARGUMENT
    assert await code_of(call("tokenizer.json", size + 1)) == grpc.StatusCode.OUT_OF_RANGE
    assert await code_of(call("tokenizer.json", 0, "nope")) == grpc.StatusCode.NOT_FOUND
    # Resuming a file already complete: one empty chunk that still says the size.
    [last] = await call("tokenizer.json", size)  # type: ignore[misc]
    assert (last.offset, last.data, last.total_size) == (size, b"", size)


# --- durability --------------------------------------------------------------------------------


async def test_state_survives_a_server_restart(tmp_path: Path, artifact: Path) -> None:
    data_dir = tmp_path / "control"
    first = await start(data_dir, artifact)
    try:
        token = first.server.create_join_token()
        reply = await first.enroll(token=token)
        md = auth(reply.node_credential)
        await first.stub.Heartbeat(pb.HeartbeatRequest(
            node_id=reply.node_id, model_version=first.version, healthy=True), metadata=md)
        await first.stub.ReportOutcomes(pb.OutcomeReport(
            node_id=reply.node_id, window_s=5.0,
            outcomes=[pb.VersionOutcomes(model_version=first.version, requests=9)]),
            metadata=md)
        key_id = first.server.data.key.key_id
    finally:
        await stop(first)
    second = await start(data_dir)
    try:
        # Same credential, same fleet version, same signing key; the token stays spent.
        answer = await second.stub.Heartbeat(
            pb.HeartbeatRequest(node_id=reply.node_id, healthy=True), metadata=md)
        assert answer.desired_model_version == first.version
        signed = await second.stub.GetManifest(
            pb.GetManifestRequest(model_version=first.version), metadata=md)
        assert signed.key_id == key_id
        verify_manifest(reply.manifest_public_key, signed.manifest_json, signed.signature)
        assert [o.requests for o in second.server.data.store.outcomes()] == [9]
        assert await code_of(second.enroll(token=token)) == grpc.StatusCode.UNAUTHENTICATED
        chunks = await fetch_all(second.stub.FetchArtifact(pb.FetchArtifactRequest(
            model_version=first.version, path="genai_config.json"), metadata=md))
        assert b"".join(c.data for c in chunks) == (artifact / "genai_config.json").read_bytes()
    finally:
        await stop(second)
