"""Router discovery: the pool follows the fleet the control plane lists.

First the grpc-free part (``plan_changes``, ``NodeDiscovery`` over a stand-in pool and lister),
then ListNodes' router-token gate on a real control server, then the whole path on real
servers: a control plane, a cloud tier on the demo cloud checkpoint (the router's one static
backend), a router with discovery, and an edge server on the demo edge model exported once
per session (``demo_edge_int4`` in conftest.py), which enrolls and heartbeats over gRPC and is
then routed to.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest

from cloud.engine import CloudEngineConfig
from cloud.scheduler import SchedulerConfig
from cloud.server import CloudServerConfig, start_cloud_server
from control.config import ControlConfig
from control.router_tokens import RouterTokens
from control.server import ControlServer, start_control_server
from core.grpc_server import ServerConfig
from edge.config import EdgeEngineConfig
from edge.server import EdgeServerConfig, start_edge_server
from model.demo import DEMO_DIR
from protos.tandem.v1 import control_pb2 as pb
from protos.tandem.v1 import inference_pb2 as ipb
from protos.tandem.v1.control_pb2_grpc import ControlStub
from protos.tandem.v1.inference_pb2_grpc import InferenceStub
from router.backends import PoolConfig
from router.cache import CacheConfig
from router.config import RouterConfig
from router.discovery import (
    DiscoveredNode,
    DiscoveryConfig,
    DiscoveryError,
    NodeDiscovery,
    plan_changes,
)
from router.frontdoor import FrontDoorConfig
from router.server import start_router
from tandem.commands import control_cmd

pytestmark = pytest.mark.timeout(90)

NODE_ID = "edge-disc"


def bearer(secret: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),)


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


# --- the decision, without grpc ----------------------------------------------------------------


class FakePool:
    def __init__(self) -> None:
        self.addresses: set[str] = set()

    async def add(self, address: str) -> object:
        self.addresses.add(address)
        return address

    async def remove(self, address: str) -> None:
        self.addresses.discard(address)


class FakeLister:
    def __init__(self) -> None:
        self.nodes: list[DiscoveredNode] = []
        self.down = False
        self.closed = False

    async def list_nodes(self) -> list[DiscoveredNode]:
        if self.down:
            raise DiscoveryError("ListNodes on control:1 failed: UNAVAILABLE: connection refused")
        return list(self.nodes)

    async def close(self) -> None:
        self.closed = True


def node(node_id: str, address: str, live: bool = True) -> DiscoveredNode:
    return DiscoveredNode(node_id, address, "v1", live)


def test_plan_adds_live_and_removes_gone_but_never_static() -> None:
    nodes = [node("a", "10.0.0.1:1"), node("b", "10.0.0.2:1", live=False),
             node("c", "10.0.0.3:1"), node("s", "cloud:1")]
    add, remove = plan_changes(nodes, owned={"10.0.0.2:1", "10.0.0.9:1"}, static={"cloud:1"})
    assert add == {"10.0.0.1:1", "10.0.0.3:1"}
    assert remove == {"10.0.0.2:1", "10.0.0.9:1"}  # not live, and no longer listed


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_discovery_follows_the_list_and_survives_an_outage() -> None:
    pool, lister, clock = FakePool(), FakeLister(), Clock()
    pool.addresses.add("cloud:1")
    discovery = NodeDiscovery(pool, lister, static={"cloud:1"}, interval_s=60,
                              remove_after_s=30, clock=clock)
    lister.nodes = [node("a", "10.0.0.1:1"), node("b", "10.0.0.2:1")]
    assert await discovery.sync()
    assert pool.addresses == {"cloud:1", "10.0.0.1:1", "10.0.0.2:1"}

    lister.down = True  # the control plane restarts: nothing leaves the pool
    assert not await discovery.sync()
    assert pool.addresses == {"cloud:1", "10.0.0.1:1", "10.0.0.2:1"}

    lister.down = False
    lister.nodes = [node("a", "10.0.0.1:1", live=False), node("b", "10.0.0.5:1")]  # b moved
    assert await discovery.sync()
    # New addresses at once; old ones only after the grace (a draining node finishes first).
    assert pool.addresses == {"cloud:1", "10.0.0.1:1", "10.0.0.2:1", "10.0.0.5:1"}
    clock.now += 20
    lister.nodes[0] = node("a", "10.0.0.1:1")  # a is back within the grace: kept
    assert await discovery.sync()
    clock.now += 10
    assert await discovery.sync()
    assert pool.addresses == {"cloud:1", "10.0.0.1:1", "10.0.0.5:1"}
    assert discovery.owned == {"10.0.0.1:1", "10.0.0.5:1"} and not discovery.leaving
    await discovery.close()
    assert lister.closed


def test_discovery_config_needs_an_address_and_a_token() -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        DiscoveryConfig("control", "tdmr_x")
    with pytest.raises(ValueError, match="router token"):
        DiscoveryConfig("control:50052", "")
    with pytest.raises(ValueError, match="remove_after_s"):
        DiscoveryConfig("control:50052", "tdmr_x", remove_after_s=-1)
    with pytest.raises(ValueError, match="or a control plane"):
        RouterConfig()


# --- ListNodes and its gate, on a real control server ------------------------------------------


@pytest.fixture
async def control(tmp_path: Path) -> AsyncIterator[ControlServer]:
    server = await start_control_server(ControlConfig(
        data_dir=tmp_path / "control", server=ServerConfig(port=0, grace_s=1.0),
        heartbeat_interval_s=1.0))
    try:
        yield server
    finally:
        await server.stop(1.0)


async def enroll(stub: ControlStub, control: ControlServer, address: str,
                 node_id: str = NODE_ID) -> str:
    reply = await stub.Enroll(pb.EnrollRequest(
        join_token=control.create_join_token(), hostname="edge-host", node_id=node_id,
        inference_address=address), timeout=5)
    return reply.node_credential


async def test_list_nodes_needs_a_router_token(control: ControlServer) -> None:
    token = control.create_router_token(note="router-1")
    async with grpc.aio.insecure_channel(control.address) as channel:
        stub = ControlStub(channel)
        credential = await enroll(stub, control, "10.0.0.7:50061")
        await stub.Heartbeat(pb.HeartbeatRequest(node_id=NODE_ID, model_version="v1",
                                                 healthy=True), metadata=bearer(credential))
        reply = await stub.ListNodes(pb.ListNodesRequest(), metadata=bearer(token), timeout=5)
        [listed] = reply.nodes
        assert (listed.node_id, listed.inference_address, listed.served_version) == (
            NODE_ID, "10.0.0.7:50061", "v1")
        assert listed.live and listed.healthy and 0 <= listed.last_heartbeat_age_s < 5

        for metadata, why in (((), "router token"), (bearer(credential), "router token"),
                              (bearer(token[:-1] + "x"), "not recognized")):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ListNodes(pb.ListNodesRequest(), metadata=metadata, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert why in (err.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as err:  # nor is a router a node
            await stub.Heartbeat(pb.HeartbeatRequest(node_id=NODE_ID), metadata=bearer(token))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

        tokens = RouterTokens(control.data.root)
        [stored] = tokens.tokens()
        assert stored.note == "router-1" and stored.secret_hash not in token  # a digest only
        tokens.revoke(stored.token_id)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ListNodes(pb.ListNodesRequest(), metadata=bearer(token), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_router_token_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="tandem")
    groups = parser.add_subparsers(dest="group", required=True)
    control_cmd.register_cloud(groups.add_parser("cloud").add_subparsers(dest="c", required=True))

    def run(*argv: str) -> int:
        args = parser.parse_args([*argv, "--data-dir", str(tmp_path)])
        return int(args.func(args))

    assert run("cloud", "token", "create", "--router", "--note", "edge router") == 0
    out = capsys.readouterr().out
    token = out.split("router token: ", 1)[1].split()[0]
    [stored] = RouterTokens(tmp_path).tokens()
    assert RouterTokens(tmp_path).authenticate(token) == stored.token_id
    assert (tmp_path / "router-tokens.json").stat().st_mode & 0o777 == 0o600
    assert run("cloud", "token", "list") == 0
    assert f"{stored.token_id}   router" in capsys.readouterr().out
    assert run("cloud", "token", "revoke", stored.token_id) == 0
    assert RouterTokens(tmp_path).tokens() == []
    assert run("cloud", "token", "revoke", stored.token_id) == 1
    assert "no router token" in capsys.readouterr().err


# --- a newly enrolled node gets traffic without a router restart -------------------------------


@pytest.fixture(scope="module")
def artifact(demo_edge_int4: Path) -> Path:
    """The session's shared export: read only (copy it to change files)."""
    return demo_edge_int4


async def test_router_routes_to_a_node_enrolled_after_it_started(
        control: ControlServer, artifact: Path) -> None:
    cloud = await start_cloud_server(CloudServerConfig(
        engine=CloudEngineConfig(checkpoint=DEMO_DIR / "cloud",
                                 scheduler=SchedulerConfig(slots=2, max_queue=2)),
        server=ServerConfig(port=0, grace_s=1.0)))
    edge = router = None
    channels: list[grpc.aio.Channel] = []
    try:
        edge = await start_edge_server(EdgeServerConfig(
            engine=EdgeEngineConfig(artifact_dir=artifact, node_id=NODE_ID),
            server=ServerConfig(port=0, grace_s=1.0)))
        router = await start_router(RouterConfig(
            backends=[cloud.address],
            discovery=DiscoveryConfig(control.address, control.create_router_token(),
                                      interval_s=0.2, remove_after_s=0.5),
            server=ServerConfig(port=0, grace_s=1.0),
            pool=PoolConfig(health_interval_s=0.2),
            front_door=FrontDoorConfig(rate_limit=None, cache=CacheConfig(enabled=False)),
            ready_timeout_s=30))
        assert [b.address for b in router.pool] == [cloud.address]

        channels = [grpc.aio.insecure_channel(a) for a in (control.address, router.address)]
        control_stub, client = ControlStub(channels[0]), InferenceStub(channels[1])
        credential = await enroll(control_stub, control, edge.address)
        served = edge.engine.info.served_by.model_version

        async def heartbeat(healthy: bool) -> None:
            await control_stub.Heartbeat(pb.HeartbeatRequest(
                node_id=NODE_ID, model_version=served, healthy=healthy),
                metadata=bearer(credential), timeout=5)

        await heartbeat(True)
        await until(lambda: (b := router.pool.get(edge.address)) is not None and b.healthy,
                    "the router to discover and health-check the new edge node")
        reply = await client.Generate(ipb.GenerateRequest(
            prompt="Return a new list", max_tokens=4, temperature=0.0, route=ipb.ROUTE_EDGE),
            timeout=30)
        assert (reply.served_by.tier, reply.served_by.node_id) == (ipb.TIER_EDGE, NODE_ID)
        assert reply.served_by.model_version == served

        await heartbeat(False)  # e.g. the node is shutting down: out of rotation
        await until(lambda: router.pool.get(edge.address) is None,
                    "the router to drop the node the control plane no longer lists as live")
        assert [b.address for b in router.pool] == [cloud.address]
    finally:
        for channel in channels:
            await channel.close()
        for server in (router, edge, cloud):
            if server is not None:
                await server.stop(1.0)
