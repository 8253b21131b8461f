"""The control plane's commands: durations, join tokens, publish and versions in-process, and
``tandem cloud control serve`` as a real process that drains on SIGTERM.

The commands are registered here on a parser of our own (``register_cloud``/``register_versions``),
exactly as ``tandem cloud`` and ``tandem model`` add them.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from control.store import ControlStore
from model.manifest import build_manifest, write_manifest
from protos.tandem.v1 import control_pb2 as pb
from protos.tandem.v1.control_pb2_grpc import ControlStub
from tandem.commands import control_cmd, model_cmd
from tandem.commands.flags import parse_duration

ROOT = Path(__file__).parents[1]
# The same wiring as tandem/cli.py, for a child process.
CHILD = """
import argparse, logging, sys
from tandem.commands import control_cmd
logging.basicConfig(level=logging.INFO)
parser = argparse.ArgumentParser(prog="tandem")
groups = parser.add_subparsers(dest="group", required=True)
control_cmd.register_cloud(groups.add_parser("cloud").add_subparsers(dest="c", required=True))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="tandem")
    groups = parser.add_subparsers(dest="group", required=True)
    control_cmd.register_cloud(groups.add_parser("cloud").add_subparsers(dest="c", required=True))
    model_cmd.register_versions(groups.add_parser("model").add_subparsers(dest="c", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def make_artifact(root: Path, version: str) -> Path:
    root.mkdir(parents=True)
    (root / "model.onnx").write_bytes(b"graph" * 1000)
    (root / "tokenizer.json").write_text("{}")
    write_manifest(root, build_manifest(root, model_version=version, base_version="b1",
                                        quantization="int8", created_by="tests"))
    return root


@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30), ("30m", 1800), ("1h", 3600), ("2d", 172_800), ("45", 45), ("1.5h", 5400),
    (" 10 m ", 600)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1w", "-1h", "0", "h", "1h30m"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"e\.g\. 30m, 1h, 2d"):
        parse_duration(text)


def test_token_create_prints_a_working_single_use_token(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("cloud", "token", "create", "--ttl", "30m", "--note", "rack 4",
               "--data-dir", str(tmp_path)) == 0
    out = capsys.readouterr().out
    token = next(line.split()[-1] for line in out.splitlines() if line.startswith("join token"))
    assert f"tandem edge install --cloud CONTROL_HOST:50052 --token {token}" in out
    with ControlStore(tmp_path / "control.db") as store:
        [listed] = store.join_tokens()
        assert listed.expires_at - listed.created_at == 1800 and listed.note == "rack 4"
        store.enroll(token, hostname="edge-a", inference_address="10.0.0.1:50061")
    assert run("cloud", "token", "list", "--data-dir", str(tmp_path)) == 0
    assert "used by edge-" in capsys.readouterr().out
    assert run("cloud", "nodes", "--json", "--data-dir", str(tmp_path)) == 0
    [node] = json.loads(capsys.readouterr().out)
    assert node["hostname"] == "edge-a"


def test_publish_and_versions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = str(tmp_path / "control")
    a = make_artifact(tmp_path / "a", "v1")
    assert run("model", "publish", str(a), "--data-dir", data, "--notes", "first") == 0
    assert "fleet's current version" in capsys.readouterr().out
    assert run("model", "publish", str(a), "--data-dir", data, "--version", "v2") == 0
    out = capsys.readouterr().out
    assert "published v2" in out and "The fleet still serves v1" in out
    assert run("model", "publish", str(a), "--data-dir", data) == 0
    assert "already published: v1" in capsys.readouterr().out
    assert run("model", "versions", "--data-dir", data) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("* v1") and "first" in lines[1] and lines[2].startswith("  v2")
    assert run("model", "versions", "--json", "--data-dir", data) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["version"], r["current"]) for r in rows] == [("v1", True), ("v2", False)]
    (a / "tokenizer.json").write_text('{"x": 1}')
    assert run("model", "publish", str(a), "--data-dir", data, "--version", "v3") == 1
    assert "changed: tokenizer.json" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_runs_until_sigterm(tmp_path: Path) -> None:
    port, log = _free_port(), tmp_path / "serve.log"
    data = tmp_path / "control"
    with open(log, "wb") as out:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, "cloud", "control", "serve", "--data-dir", str(data),
             "--port", str(port), "--no-metrics", "--heartbeat-interval", "2s"],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 30
            while True:
                assert child.poll() is None, f"server died:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"never healthy:\n{log.read_text()}"
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if status.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
            # A token made by another process (the CLI) while the server runs works at once.
            with ControlStore(data / "control.db") as store:
                token = store.create_join_token(60)
            reply = ControlStub(channel).Enroll(pb.EnrollRequest(
                join_token=token, hostname="edge-a", inference_address="10.0.0.1:50061"),
                timeout=5)
            assert reply.node_id and reply.heartbeat_interval_ms == 2000
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=20) == 0, log.read_text()
        assert "control plane serving on" in log.read_text()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
