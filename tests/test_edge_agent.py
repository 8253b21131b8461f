"""The edge agent against a real control plane (``control.server`` on port 0, SQLite and
artifact store in a temporary directory): install, re-install, resumable and verified downloads,
and ``tandem edge run`` swapping models under load, as real processes where it matters.

The shipped demo edge model is exported once per session as int4 (``demo_edge_int4`` in
conftest.py); V1 is a copy of it under its own name, V2 the same artifact with one file changed,
so both load and swap like any two versions would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from control.config import ControlConfig
from control.publish import publish_model
from control.server import ControlServer, start_control_server
from core.grpc_server import ServerConfig
from core.launcher import ManagedProcess, free_port, tandem_argv
from edge.agent.client import ControlClient
from edge.agent.config import UNIT_NAME, AgentConfig, read_node_config
from edge.agent.download import ArtifactRejected, check_signed_manifest, download_version
from edge.agent.install import install
from edge.agent.loop import EdgeAgent
from edge.config import EdgeEngineConfig
from edge.engine import EdgeEngine
from edge.server import EdgeServerConfig, start_edge_server
from model.manifest import build_manifest, read_manifest, verify_artifact, write_manifest
from protos.tandem.v1 import inference_pb2 as pb
from protos.tandem.v1.inference_pb2_grpc import InferenceStub

V1, V2 = "agent-v1", "agent-v2"
CHUNK = 64 * 1024  # small chunks: a download of the 5.9 MB weights takes ~90 of them
TIMEOUT = 30.0


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory,
              demo_edge_int4_copy: Callable[[Path, str], Path]) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("agent-artifacts")
    demo_edge_int4_copy(root / V1, V1)
    shutil.copytree(root / V1, root / V2)
    with open(root / V2 / "tokenizer_config.json", "a") as fh:
        fh.write("\n")  # still the same JSON; another sha256, so another blob to fetch
    m = read_manifest(root / V1)
    write_manifest(root / V2, build_manifest(root / V2, model_version=V2,
                                             base_version=m.base_version,
                                             quantization=m.quantization,
                                             created_by=m.created_by))
    return {V1: root / V1, V2: root / V2}


@pytest.fixture
async def control(tmp_path: Path, artifacts: dict[str, Path]) -> AsyncIterator[ControlServer]:
    """A control plane with V1 published as the fleet's version."""
    server = await start_control_server(ControlConfig(
        data_dir=tmp_path / "control", server=ServerConfig(port=0, grace_s=1.0),
        heartbeat_interval_s=0.2, chunk_bytes=CHUNK))
    try:
        publish_model(server.data, artifacts[V1])
        yield server
    finally:
        await server.stop(1.0)


async def until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Poll ``condition`` (never a fixed sleep) until it holds."""
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, "condition did not hold in time"
        await asyncio.sleep(0.02)


async def run_cli(*args: str) -> tuple[int, str]:
    """The real ``tandem`` CLI in a child process (the control server shares our loop)."""
    proc = await asyncio.create_subprocess_exec(
        *tandem_argv(*args), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode()


def identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


# --- install -----------------------------------------------------------------------------------


async def test_install_enrolls_verifies_and_writes_the_unit_and_reinstall_is_safe(
    tmp_path: Path, control: ControlServer
) -> None:
    store, data_dir = control.data.store, tmp_path / "node"
    token = store.create_join_token(600)
    code, out = await run_cli("edge", "install", "--cloud", control.address, "--token", token,
                              "--data-dir", str(data_dir), "--no-systemd", "--port", "50999")
    assert code == 0, out
    node = read_node_config(data_dir)
    assert node is not None and f"node {node.node_id} enrolled" in out
    assert (data_dir / "node.json").stat().st_mode & 0o777 == 0o600
    assert node.credential.startswith("tdmn_") and node.inference_address == "127.0.0.1:50999"
    assert (node.current_version, node.previous_version) == (V1, "")
    assert [n.node_id for n in store.nodes()] == [node.node_id]
    assert store.join_tokens()[0].used_by == node.node_id  # spent
    artifact = data_dir / "artifacts" / V1
    verify_artifact(artifact, read_manifest(artifact))
    unit = (data_dir / UNIT_NAME).read_text()
    assert f"edge run --data-dir {data_dir}" in unit and "ExecStart=" in unit
    assert "sudo systemctl enable --now tandem-edge.service" in out

    # Again with the spent token: the enrollment that works is kept; nothing is fetched again.
    weights = identity(artifact / "model.onnx.data")
    again = await install(control.address, token, data_dir, no_systemd=True, port=50999)
    assert again.kept_enrollment and again.node == node
    assert identity(artifact / "model.onnx.data") == weights

    # With a fresh token: re-enrolled under the same id with a new credential.
    fresh = await install(control.address, store.create_join_token(600), data_dir,
                          no_systemd=True, port=50999)
    assert not fresh.kept_enrollment and fresh.node.node_id == node.node_id
    assert fresh.node.credential != node.credential and len(store.nodes()) == 1
    assert identity(artifact / "model.onnx.data") == weights
    stored = read_node_config(data_dir)
    assert stored is not None and stored.credential == fresh.node.credential

    # A spent token and a credential the cloud no longer knows: install refuses, clearly.
    code, out = await run_cli("edge", "install", "--cloud", control.address, "--token", token,
                              "--data-dir", str(tmp_path / "other"), "--no-systemd")
    assert code == 1 and "already used" in out


# --- downloads ---------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


async def test_an_interrupted_download_resumes_from_the_bytes_on_disk(
    tmp_path: Path, control: ControlServer, artifacts: dict[str, Path]
) -> None:
    installed = await install(control.address, control.data.store.create_join_token(600),
                              tmp_path / "node", no_systemd=True)
    publish_model(control.data, artifacts[V2], make_current=False)
    config = AgentConfig(data_dir=tmp_path / "node")
    key = installed.node.manifest_public_key
    total = read_manifest(artifacts[V2]).total_size

    chunks = 0

    def cut_after_five(path: str, done: int, size: int) -> None:
        nonlocal chunks
        chunks += 1
        if path == "model.onnx.data" and done >= 5 * CHUNK:
            raise Interrupted  # as if the process died mid-file

    async with ControlClient(control.address, installed.node.credential) as client:
        with pytest.raises(Interrupted):
            await download_version(client, V2, config.artifacts_dir, key,
                                   progress=cut_after_five)
        partial = config.artifacts_dir / ".partial" / V2 / "model.onnx.data"
        on_disk = partial.stat().st_size
        assert on_disk == 5 * CHUNK and not config.artifact(V2).exists()

        final, stats = await download_version(client, V2, config.artifacts_dir, key)
        assert final == config.artifact(V2)
        assert stats.bytes_resumed >= on_disk
        assert stats.bytes_fetched == total - stats.bytes_resumed < total
        verify_artifact(final, read_manifest(final))
        assert not partial.exists()

        # A truncated file in a finished version is noticed and fetched again.
        weights = final / "model.onnx.data"
        with open(weights, "r+b") as fh:
            fh.truncate(1000)
        final, stats = await download_version(client, V2, config.artifacts_dir, key)
        verify_artifact(final, read_manifest(final))
        assert stats.bytes_fetched == total  # the damaged copy was thrown away whole


def _flipped(data: bytes) -> bytes:
    return data[:10] + bytes([data[10] ^ 0x01]) + data[11:]


def _flip_byte(path: Path) -> bytes:
    original = path.read_bytes()
    path.chmod(0o644)
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))
    return original


async def test_tampered_blob_and_bad_signature_are_rejected_and_the_node_keeps_serving(
    tmp_path: Path, control: ControlServer, artifacts: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    installed = await install(control.address, control.data.store.create_join_token(600),
                              tmp_path / "node", no_systemd=True)
    config = AgentConfig(data_dir=tmp_path / "node")
    v2, _ = publish_model(control.data, artifacts[V2], make_current=False)
    # Only the tokenizer config differs from V1: that blob is V2's alone.
    entry = next(f for f in read_manifest(artifacts[V2]).files
                 if f.path == "tokenizer_config.json")
    blob = control.data.artifacts.blob_path(entry.sha256)
    server = await start_edge_server(EdgeServerConfig(
        engine=EdgeEngineConfig(artifact_dir=config.artifact(V1), node_id=installed.node.node_id),
        server=ServerConfig(port=0, grace_s=1.0)))
    assert isinstance(server.engine, EdgeEngine)
    engine = server.engine
    try:
        async with ControlClient(control.address) as client:
            agent = EdgeAgent(config, installed.node, engine, client)
            original = _flip_byte(blob)
            assert not await agent.sync_to(V2)
            assert "tampered file: tokenizer_config.json" in caplog.text
            blob.write_bytes(original)

            other = Ed25519PrivateKey.generate().public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            agent.node = dataclasses.replace(agent.node, manifest_public_key=other.decode())
            assert not await agent.sync_to(V2)
            assert "signed by key" in caplog.text and v2.key_id in caplog.text

            # Same key, altered bytes: the signature itself does not verify.
            signed = await client.get_manifest(V2)
            key = installed.node.manifest_public_key
            for body, signature in ((signed.manifest_json, _flipped(signed.signature)),
                                    (_flipped(signed.manifest_json), signed.signature)):
                with pytest.raises(ArtifactRejected, match="signature does not verify"):
                    check_signed_manifest(key, V2, body, signature, signed.key_id)

            rejected = [r for r in caplog.records if "REJECTED" in r.getMessage()]
            assert len(rejected) == 2 and all(r.levelno == logging.ERROR for r in rejected)
            # Still V1, served and on record; nothing of V2 was installed.
            assert engine.info.served_by.model_version == V1
            assert read_node_config(config.data_dir).current_version == V1  # type: ignore[union-attr]
            assert not config.artifact(V2).exists()
            stub = InferenceStub(grpc.aio.insecure_channel(server.address))
            resp = await stub.Generate(pb.GenerateRequest(prompt="Return the", max_tokens=4),
                                       timeout=TIMEOUT)
            assert resp.served_by.model_version == V1

            agent.node = installed.node  # the cloud's key again: the same version goes through
            assert await agent.sync_to(V2)
            assert engine.info.served_by.model_version == V2
            node = read_node_config(config.data_dir)
            assert node is not None and (node.current_version, node.previous_version) == (V2, V1)
    finally:
        await server.stop(1.0)


# --- tandem edge run ---------------------------------------------------------------------------


async def test_edge_run_swaps_when_the_cloud_wants_another_version(
    tmp_path: Path, control: ControlServer, artifacts: dict[str, Path]
) -> None:
    store, data_dir, port = control.data.store, tmp_path / "node", free_port()
    code, out = await run_cli("edge", "install", "--cloud", control.address, "--token",
                              store.create_join_token(600), "--data-dir", str(data_dir),
                              "--no-systemd", "--port", str(port))
    assert code == 0, out
    node_id = read_node_config(data_dir).node_id  # type: ignore[union-attr]
    proc = ManagedProcess(
        "edge-run", tandem_argv("edge", "run", "--data-dir", str(data_dir), "--threads", "1",
                                "--no-metrics", "--report-every", "0.5"),
        tmp_path / "edge-run.log", address=f"127.0.0.1:{port}").start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    failures: list[str] = []
    seen: list[str] = []
    stop = asyncio.Event()

    async def steady_client() -> None:
        stub = InferenceStub(channel)
        while not stop.is_set():
            req = pb.GenerateRequest(prompt="Return the number of", max_tokens=12,
                                     temperature=0.0)
            try:
                chunks = [c async for c in stub.GenerateStream(req, timeout=TIMEOUT)]
                seen.append(chunks[-1].served_by.model_version)
            except grpc.aio.AioRpcError as e:
                failures.append(f"{e.code().name}: {e.details()}")

    try:
        await asyncio.to_thread(proc.wait_healthy, 60.0)
        clients = [asyncio.create_task(steady_client()) for _ in range(3)]
        await until(lambda: store.node(node_id).served_version == V1 and len(seen) > 10)

        publish_model(control.data, artifacts[V2], make_current=False)
        store.set_target_version([node_id], V2)
        await until(lambda: seen[-3:] == [V2] * 3, timeout_s=30.0)
        await until(lambda: store.node(node_id).served_version == V2)
        on_disk = read_node_config(data_dir)
        assert on_disk is not None
        assert (on_disk.current_version, on_disk.previous_version) == (V2, V1)
        assert (data_dir / "artifacts" / V1).is_dir()  # kept for rollback

        store.set_target_version([node_id], V1)  # roll back: already on disk, no download
        await until(lambda: seen[-3:] == [V1] * 3, timeout_s=30.0)
        stop.set()
        await asyncio.gather(*clients)
        assert failures == [], failures
        assert seen[0] == V1 and V2 in seen
        await until(lambda: {w.version for w in store.outcomes(node_ids=[node_id])} >= {V1, V2})
        reported = store.outcomes(node_ids=[node_id])
        assert all(w.errors == 0 for w in reported) and sum(w.requests for w in reported) > 0
        # SIGTERM: drains, sends a last report (our loop must stay free to answer it), exits 0.
        assert await asyncio.to_thread(proc.stop, 15.0) == 0
        log_text = proc.log_path.read_text()
        assert f"model {V1} is already on disk and verified" in log_text, proc.log_tail()
    finally:
        stop.set()
        await channel.close()
        await asyncio.to_thread(proc.stop, 5.0)
    assert json.loads((data_dir / "node.json").read_text())["current_version"] == V1


def test_the_agent_path_imports_no_torch() -> None:
    code = (
        "import sys, edge.agent.install, edge.agent.run, edge.agent.loop; "
        "bad = {'torch', 'transformers'} & set(sys.modules); "
        "sys.exit(f'the agent imported {bad}' if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


async def test_the_agent_rides_out_a_control_plane_outage(
    tmp_path: Path, artifacts: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="edge.agent.loop")
    cloud = ControlConfig(data_dir=tmp_path / "control",
                          server=ServerConfig(port=free_port(), grace_s=0.5),
                          heartbeat_interval_s=0.1, chunk_bytes=CHUNK)
    control = await start_control_server(cloud)
    publish_model(control.data, artifacts[V1])
    installed = await install(control.address, control.data.store.create_join_token(600),
                              tmp_path / "node", no_systemd=True)
    node_id = installed.node.node_id
    server = await start_edge_server(EdgeServerConfig(
        engine=EdgeEngineConfig(artifact_dir=tmp_path / "node" / "artifacts" / V1,
                                node_id=node_id),
        server=ServerConfig(port=0, grace_s=1.0)))
    assert isinstance(server.engine, EdgeEngine)
    config = AgentConfig(data_dir=tmp_path / "node", backoff_min_s=0.05, backoff_max_s=0.2,
                         rpc_timeout_s=1.0)
    channel = grpc.aio.insecure_channel(server.address)
    async with ControlClient(control.address) as client:
        agent = asyncio.create_task(EdgeAgent(config, installed.node, server.engine,
                                              client).run())
        try:
            await until(lambda: control.data.store.node(node_id).served_version == V1)
            await control.stop(0.5)
            await until(lambda: "still serving agent-v1; retrying" in caplog.text)
            resp = await InferenceStub(channel).Generate(
                pb.GenerateRequest(prompt="Return the", max_tokens=4), timeout=TIMEOUT)
            assert resp.served_by.model_version == V1 and not agent.done()

            control = await start_control_server(cloud)  # back, same port and state
            back = time.time()
            await until(lambda: (control.data.store.node(node_id).last_heartbeat or 0) > back)
            assert not agent.done()
        finally:
            agent.cancel()
            await asyncio.gather(agent, return_exceptions=True)
            await channel.close()
            await server.stop(1.0)
            await control.stop(0.5)
