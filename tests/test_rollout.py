"""The rollout controller on a real SQLite store with synthetic outcomes and a settable clock:
canary selection, promotion, roll back on errors, latency, escalations or a version that never
loads, waiting for traffic, operator decisions; then ``tandem rollout`` in-process, and the
control server's background tick deciding a rollout driven over real gRPC.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

if TYPE_CHECKING:
    from conftest import Clock

from control.config import ControlConfig
from control.records import ModelVersion, NodeLoad, VersionOutcome
from control.rollout import (
    CONFIG_FILE,
    IDLE,
    PROMOTE,
    ROLLBACK,
    WAIT,
    RolloutConfig,
    RolloutController,
)
from control.server import start_control_server
from control.store import ControlStore
from core.errors import InvalidRequest, WrongState
from core.grpc_server import ServerConfig
from protos.tandem.v1 import control_pb2 as pb
from protos.tandem.v1.control_pb2_grpc import ControlStub
from tandem.commands import rollout_cmd

pytestmark = pytest.mark.timeout(60)

CONFIG = RolloutConfig(window_s=300, min_requests=100, min_duration_s=60, load_timeout_s=120,
                       node_stale_s=15)
NODES = ("edge-a", "edge-b", "edge-c", "edge-d", "edge-e")


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[ControlStore]:
    with ControlStore(tmp_path / "control.db", clock=clock) as s:
        s.add_version(version("v1"))  # the first publish: the fleet's version
        s.add_version(version("v2"))
        yield s


def version(name: str) -> ModelVersion:
    manifest = f'{{"model_version":"{name}"}}'.encode()
    return ModelVersion(
        version=name, manifest_path=f"manifests/{name}.json", manifest_json=manifest,
        manifest_sha256=hashlib.sha256(manifest).hexdigest(), signature=b"s" * 64,
        key_id="ed25519:0000000000000000", base_version="demo-edge", parent_version=None,
        quantization="int4", total_size=123, created_at=0.0, notes="")


def enroll(store: ControlStore, *node_ids: str, serving: str = "v1") -> None:
    for node_id in node_ids:
        store.enroll(store.create_join_token(3600), hostname=node_id,
                     inference_address=f"10.0.0.{len(store.nodes()) + 1}:50061", node_id=node_id)
        store.heartbeat(node_id, served_version=serving)


def serve(store: ControlStore, node_id: str, version: str, *, loading: str = "",
          healthy: bool = True) -> None:
    store.heartbeat(node_id, served_version=version, loading_version=loading, healthy=healthy,
                    load=NodeLoad())


def later(store: ControlStore, clock: Clock, seconds: float) -> None:
    """Move the clock; every node heartbeats again with what it said last (stays live)."""
    clock.now += seconds
    for n in store.nodes():
        store.heartbeat(n.node_id, served_version=n.served_version or "",
                        loading_version=n.loading_version or "", healthy=n.healthy)


def report(store: ControlStore, node_id: str, version: str, requests: int, errors: int = 0,
           escalations: int = 0, p99: float = 100.0) -> None:
    store.record_outcomes(node_id, 15.0, [VersionOutcome(version, requests, errors, escalations,
                                                         p99 / 2, p99)])


def baseline_traffic(store: ControlStore, requests: int = 50) -> None:
    """edge-b..e serve v1 with 2% errors, 4% escalations, p99 100 ms."""
    for node in NODES[1:]:
        report(store, node, "v1", requests, errors=requests // 50, escalations=requests // 25)


@pytest.fixture
def rollout(store: ControlStore, clock: Clock) -> RolloutController:
    """Five live nodes on v1; v2 started on edge-a (ceil(0.2 x 5) = 1) and loaded there."""
    enroll(store, *NODES)
    controller = RolloutController(store, CONFIG)
    started = controller.start("v2")
    assert started.canary_node_ids == ("edge-a",) and started.previous_version == "v1"
    clock.now += 5
    serve(store, "edge-a", "v2")
    return controller


# --- canary selection ---------------------------------------------------------------------------


def test_canaries_are_a_rounded_up_fraction_of_live_nodes_in_id_order(
        store: ControlStore, clock: Clock) -> None:
    enroll(store, "edge-f", "edge-c")  # heard from long ago
    clock.now += 60
    enroll(store, "edge-e", "edge-b", "edge-a", "edge-d")
    serve(store, "edge-b", "v1", healthy=False)  # live means healthy too
    controller = RolloutController(store, CONFIG)
    assert controller.live_nodes() == ["edge-a", "edge-d", "edge-e"]
    assert controller.pick_canaries(0.2) == ["edge-a"]  # at least one
    assert controller.pick_canaries(0.5) == ["edge-a", "edge-d"]  # ceil(1.5)
    assert controller.pick_canaries(1.0) == ["edge-a", "edge-d", "edge-e"]
    with pytest.raises(InvalidRequest, match="fraction"):
        controller.pick_canaries(0.0)

    started = controller.start("v2", 0.5)
    assert started.canary_node_ids == ("edge-a", "edge-d") and started.fraction == 0.5
    assert store.node("edge-a").desired_version == "v2"
    assert store.node("edge-e").desired_version == "v1"
    with pytest.raises(WrongState, match="still in canary"):
        controller.start("v2")


def test_no_live_node_means_no_rollout(store: ControlStore, clock: Clock) -> None:
    enroll(store, "edge-a")
    clock.now += 16
    with pytest.raises(WrongState, match="no live edge node"):
        RolloutController(store, CONFIG).start("v2")
    assert store.active_rollout() is None


# --- verdicts ----------------------------------------------------------------------------------


def test_good_version_is_promoted_after_min_duration(
        store: ControlStore, clock: Clock, rollout: RolloutController) -> None:
    baseline_traffic(store)
    report(store, "edge-a", "v2", 150, errors=3, escalations=5, p99=110.0)
    later(store, clock, 30)
    early = rollout.tick()
    assert early.action == WAIT and "promoting after" in early.reason
    assert store.active_rollout() is not None

    later(store, clock, 30)
    verdict = rollout.tick()
    assert verdict.action == PROMOTE, verdict.reason
    assert verdict.canary is not None and verdict.baseline is not None
    assert (verdict.canary.requests, verdict.canary.nodes) == (150, ("edge-a",))
    assert verdict.baseline.requests == 200 and len(verdict.baseline.nodes) == 4
    assert verdict.canary.latency_p99_ms == pytest.approx(110.0)
    [decided] = store.rollouts()
    assert decided.state == "promoted" and "not worse than the baseline" in decided.reason
    assert "150 requests" in decided.reason and "200 requests" in decided.reason
    assert store.current_version() == "v2"
    assert {n.desired_version for n in store.nodes()} == {"v2"}
    assert rollout.tick().action == IDLE


@pytest.mark.parametrize(("errors", "p99", "escalations", "why"), [
    (15, 100.0, 6, "error rate 10.0% vs 2.0%"),
    (3, 300.0, 6, "p99 latency 300 ms vs 100 ms"),
    (3, 100.0, 30, "escalation rate 20.0% vs 4.0%"),
])
def test_worse_version_is_rolled_back(store: ControlStore, clock: Clock,
                                      rollout: RolloutController, errors: int, p99: float,
                                      escalations: int, why: str) -> None:
    baseline_traffic(store)
    report(store, "edge-a", "v2", 150, errors=errors, escalations=escalations, p99=p99)
    later(store, clock, 10)  # no minimum duration for bad news
    verdict = rollout.tick()
    assert verdict.action == ROLLBACK and why in verdict.reason, verdict.reason
    [decided] = store.rollouts()
    assert decided.state == "rolled_back" and why in decided.reason
    assert store.current_version() == "v1"
    assert store.node("edge-a").desired_version == "v1"  # back at its next heartbeat


def test_small_latency_differences_are_jitter(store: ControlStore, clock: Clock,
                                              rollout: RolloutController) -> None:
    for node in NODES[1:]:
        report(store, node, "v1", 50, p99=10.0)
    report(store, "edge-a", "v2", 150, p99=30.0)  # 3x, but 20 ms: under the slack
    later(store, clock, 61)
    assert rollout.evaluate().action == PROMOTE


def test_not_enough_traffic_waits(store: ControlStore, clock: Clock,
                                  rollout: RolloutController) -> None:
    baseline_traffic(store)
    report(store, "edge-a", "v2", 40, errors=4)  # 10% errors, but only 40 requests
    later(store, clock, 200)
    verdict = rollout.tick()
    assert verdict.action == WAIT
    assert "waiting for traffic: 40 canary and 200 baseline requests of 100" in verdict.reason
    assert store.active_rollout() is not None

    # Outcomes older than the window no longer count; a baseline gone quiet falls back to
    # what the fleet served on v1 since a window before the start.
    later(store, clock, 250)
    report(store, "edge-a", "v2", 70)
    verdict = rollout.evaluate()
    assert verdict.canary is not None and verdict.canary.requests == 70
    assert verdict.baseline is not None and verdict.baseline.requests == 200
    assert verdict.baseline.scope == "every node since 13 min ago"


def test_failing_canary_is_rolled_back_before_the_baseline_has_traffic(
        store: ControlStore, clock: Clock, rollout: RolloutController) -> None:
    report(store, "edge-a", "v2", 20, errors=20)
    later(store, clock, 10)
    verdict = rollout.tick()
    assert verdict.action == ROLLBACK and "fail 100% of requests on v2" in verdict.reason
    assert store.rollouts()[0].state == "rolled_back"


def test_canary_that_cannot_load_the_version_is_rolled_back(
        store: ControlStore, clock: Clock) -> None:
    enroll(store, *NODES)
    controller = RolloutController(store, CONFIG)
    controller.start("v2")
    baseline_traffic(store)
    clock.now += 60
    for node in NODES[1:]:
        serve(store, node, "v1")
    serve(store, "edge-a", "v1", loading="v2")  # e.g. a signature that does not verify
    verdict = controller.tick()
    assert verdict.action == WAIT and verdict.pending == ("edge-a serves v1, loading v2",)
    assert "waiting for canaries to serve v2 (60 s of 2 min)" in verdict.reason

    clock.now += 61
    for node in NODES:
        serve(store, node, "v1")
    verdict = controller.tick()
    assert verdict.action == ROLLBACK and "load timeout" in verdict.reason
    assert "edge-a serves v1" in verdict.reason
    assert store.rollouts()[0].state == "rolled_back"


def test_silent_canary_is_pending(store: ControlStore, clock: Clock,
                                  rollout: RolloutController) -> None:
    clock.now += 30
    verdict = rollout.evaluate()
    assert verdict.pending == ("edge-a not heard from for 30 s",)
    clock.now += 100
    assert rollout.evaluate().action == ROLLBACK


def test_one_node_fleet_is_judged_against_its_own_past(store: ControlStore,
                                                       clock: Clock) -> None:
    enroll(store, "edge-a")
    report(store, "edge-a", "v1", 200, errors=2)
    later(store, clock, 30)
    controller = RolloutController(store, CONFIG)
    controller.start("v2")
    serve(store, "edge-a", "v2")
    report(store, "edge-a", "v2", 150, errors=1)
    later(store, clock, 61)
    verdict = controller.evaluate()
    assert verdict.action == PROMOTE, verdict.reason
    assert verdict.baseline is not None and verdict.baseline.requests == 200
    assert verdict.baseline.scope.startswith("every node since")


def test_operator_decisions(store: ControlStore, clock: Clock,
                            rollout: RolloutController) -> None:
    aborted = rollout.abort("wrong build")
    assert aborted.state == "aborted"
    assert aborted.reason.startswith("aborted by operator: wrong build (verdict then: wait:")
    assert store.node("edge-a").desired_version == "v1" and store.current_version() == "v1"
    with pytest.raises(WrongState, match="no rollout is in canary"):
        rollout.promote()

    rollout.start("v2")
    promoted = rollout.promote()
    assert promoted.state == "promoted" and store.current_version() == "v2"


def test_auto_decide_off_only_judges(store: ControlStore, clock: Clock) -> None:
    enroll(store, *NODES)
    controller = RolloutController(store, RolloutConfig(
        window_s=300, min_requests=100, min_duration_s=0, auto_decide=False))
    controller.start("v2")
    report(store, "edge-a", "v2", 20, errors=20)
    assert controller.tick().action == ROLLBACK
    assert store.active_rollout() is not None


def test_config_saved_by_the_server_is_what_the_cli_judges_with(tmp_path: Path) -> None:
    assert RolloutConfig.load(tmp_path) == RolloutConfig()
    CONFIG.save(tmp_path)
    assert RolloutConfig.load(tmp_path) == CONFIG
    with pytest.raises(ValueError, match="fraction"):
        RolloutConfig(fraction=1.5)


# --- tandem rollout ----------------------------------------------------------------------------


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="tandem")
    rollout_cmd.register(parser.add_subparsers(dest="group", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_rollout_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "control"
    data.mkdir()
    CONFIG.save(data)
    with ControlStore(data / "control.db") as store:  # the real clock, as the CLI's
        store.add_version(version("v1"))
        store.add_version(version("v2"))
        enroll(store, *NODES)
    dd = ("--data-dir", str(data))

    assert run("rollout", "status", *dd) == 0
    assert "no rollout in canary" in capsys.readouterr().out
    assert run("rollout", "start", "v2", "--fraction", "0.4", *dd) == 0
    assert "v2 to 2 of 5 live node(s): edge-a, edge-b" in capsys.readouterr().out
    assert run("rollout", "start", "v2", *dd) == 1
    assert "still in canary" in capsys.readouterr().err

    with ControlStore(data / "control.db") as store:
        serve(store, "edge-a", "v2")
        report(store, "edge-a", "v2", 30)
    assert run("rollout", "status", *dd) == 0
    out = capsys.readouterr().out
    assert "canaries: edge-a, edge-b (fraction 0.4)" in out
    assert "pending:  edge-b serves v1, loading" not in out and "pending:  edge-b serves v1" in out
    assert "verdict:  wait: waiting for canaries to serve v2" in out
    assert run("rollout", "status", "--json", *dd) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["verdict"]["action"] == WAIT
    assert status["verdict"]["canary"]["requests"] == 30
    assert status["verdict"]["rollout"]["canary_node_ids"] == ["edge-a", "edge-b"]
    assert status["thresholds"]["min_requests"] == CONFIG.min_requests

    assert run("rollout", "abort", "--reason", "testing", *dd) == 0
    assert "aborted: canaries return to v1" in capsys.readouterr().out
    assert run("rollout", "promote", *dd) == 1
    assert "no rollout is in canary" in capsys.readouterr().err
    assert run("rollout", "status", "--json", *dd) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["verdict"]["action"] == IDLE
    assert status["last_rollout"]["state"] == "aborted"
    assert "testing" in status["last_rollout"]["reason"]


# --- the control server's tick, over real gRPC -------------------------------------------------


async def test_control_server_promotes_on_its_own(tmp_path: Path) -> None:
    """Three nodes enroll, heartbeat and report over gRPC; the server's tick promotes v2."""
    rollout_config = RolloutConfig(window_s=60, min_requests=20, min_duration_s=0,
                                   node_stale_s=3, tick_interval_s=0.1)
    server = await start_control_server(ControlConfig(
        data_dir=tmp_path / "control", server=ServerConfig(port=0, grace_s=1.0),
        heartbeat_interval_s=1.0), rollout=rollout_config)
    channel = grpc.aio.insecure_channel(server.address)
    try:
        assert RolloutConfig.load(tmp_path / "control") == rollout_config
        assert (tmp_path / "control" / CONFIG_FILE).exists()
        store = server.data.store
        await asyncio.to_thread(store.add_version, version("v1"))
        await asyncio.to_thread(store.add_version, version("v2"))
        stub = ControlStub(channel)
        credentials = {}
        for node_id in ("edge-a", "edge-b", "edge-c"):
            reply = await stub.Enroll(pb.EnrollRequest(
                join_token=server.create_join_token(), hostname=node_id, node_id=node_id,
                inference_address="127.0.0.1:1"), timeout=5)
            credentials[node_id] = (("authorization", f"Bearer {reply.node_credential}"),)

        async def heartbeat(node_id: str, serving: str) -> str:
            reply = await stub.Heartbeat(pb.HeartbeatRequest(
                node_id=node_id, model_version=serving, healthy=True),
                metadata=credentials[node_id], timeout=5)
            return reply.desired_model_version

        async def report(node_id: str, served: str, requests: int) -> None:
            await stub.ReportOutcomes(pb.OutcomeReport(node_id=node_id, window_s=1.0, outcomes=[
                pb.VersionOutcomes(model_version=served, requests=requests, errors=0,
                                   latency_p50_ms=20, latency_p99_ms=40)]),
                metadata=credentials[node_id], timeout=5)

        for node_id in credentials:
            assert await heartbeat(node_id, "v1") == "v1"
        await asyncio.to_thread(RolloutController(store, rollout_config).start, "v2")
        assert await heartbeat("edge-a", "v1") == "v2"  # the canary is told to move
        assert await heartbeat("edge-b", "v1") == "v1"
        assert await heartbeat("edge-a", "v2") == "v2"  # ... and says it did
        for node_id, served in (("edge-a", "v2"), ("edge-b", "v1"), ("edge-c", "v1")):
            await report(node_id, served, 25)

        deadline = time.monotonic() + 10
        while store.active_rollout() is not None:
            assert time.monotonic() < deadline, "the background tick never decided"
            await asyncio.sleep(0.05)
        [decided] = store.rollouts()
        assert decided.state == "promoted", decided.reason
        assert await heartbeat("edge-c", "v1") == "v2"  # the whole fleet follows
    finally:
        await channel.close()
        await server.stop(1.0)
