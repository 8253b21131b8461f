"""The edge fleet end to end on real processes: canary rollouts under steady client load.

A control plane (``tandem cloud control serve`` with short rollout settings), a cloud tier
(``tandem cloud serve``), three edge nodes installed with ``tandem edge install --no-systemd``
into temporary directories (a join token each) and run with ``tandem edge run``, and a router
that learns the nodes from the control plane (``--control`` with a router token) and has the
cloud as its static backend. Everything is driven through the CLI, as an operator would.

Three versions of the shipped demo edge model are published:

* v1, the int4 export: the first published, so the fleet's version; nodes install it;
* v2, the int8 export: a good version; a canary rollout to one node promotes it on its own;
* v3, the int4 export with ``model.onnx`` cut in half *before* publishing: signed, every
  sha256 matches, but it cannot load. The canary keeps serving v2, and the controller rolls
  v3 back when the canary does not serve it within the load timeout.

Clients send edge-pinned and auto-routed requests through the router the whole time; not one
may fail. Marked slow: six servers and two exports, about a minute on 2 cores.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from fleet_cli import run_cli, token_from

from core import errors
from core.launcher import ManagedProcess, free_port, stop_all, tandem_argv
from edge.agent.config import read_node_config
from model.checkpoint import checkpoint_version
from model.export import export_edge_artifact
from model.manifest import build_manifest, read_manifest, write_manifest
from tandem.client import AsyncClient

pytestmark = pytest.mark.slow

EDGE_CHECKPOINT = Path(__file__).parents[1] / "model" / "demo_pair" / "edge"
V1, V2, V3 = "fleet-v1-int4", "fleet-v2-int8", "fleet-v3-broken"
NODES = 3
# One canary of three: ceil(0.33 x 3) = 1 (0.34 x 3 = 1.02 would round up to two).
FRACTION = "0.33"
HEARTBEAT_S = 1  # nodes are live while heard from within three of these
LOAD_TIMEOUT_S = 20  # a canary must serve the version by then, or it is rolled back
CONTROL_FLAGS = (
    "--heartbeat-interval", str(HEARTBEAT_S),
    # Enough requests per side that one slow moment on a busy machine is not a p99 verdict.
    "--rollout-window", "30s", "--rollout-min-requests", "40", "--rollout-min-duration", "4s",
    "--rollout-load-timeout", f"{LOAD_TIMEOUT_S}s", "--rollout-interval", "1s",
)
# Easy prompts stay on the edge when auto-routed; the hard one goes to the cloud.
EASY = ("Return a new list containing all items from the iterable in ascending order.",
        "Return the number of items in the container.",
        "Read the whole file and return its contents as a string.")
HARD = "zq xv 9#@ plk qq zzz ~~ 77 wxq jj ## kk"
# Clients at once: edge-pinned, and auto-routed (easy and hard prompts in turn).
EDGE_WORKERS, AUTO_WORKERS = 4, 2
T = TypeVar("T")


# --- the client load ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """One client request through the router, as the client saw it (wall-clock times)."""

    route: str
    sent: float
    done: float
    status: str  # "OK" or the gRPC status name of the failure
    tier: str = ""
    node_id: str = ""
    version: str = ""
    detail: str = ""


class Load:
    """Closed-loop clients on the SDK's AsyncClient, in a thread with its own event loop."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.outcomes: list[Outcome] = []  # appended to by the load thread only
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()),
                                        name="client-load", daemon=True)

    def start(self) -> Load:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(90)
        assert not self._thread.is_alive(), "the client load did not stop"

    def since(self, t: float) -> list[Outcome]:
        return [o for o in list(self.outcomes) if o.sent >= t]

    async def _main(self) -> None:
        async with AsyncClient(self.address, timeout=60) as client:
            await asyncio.gather(*(self._worker(client, "edge", i) for i in range(EDGE_WORKERS)),
                                 *(self._worker(client, "auto", i) for i in range(AUTO_WORKERS)))

    async def _worker(self, client: AsyncClient, route: str, seed: int) -> None:
        n = seed
        while not self._stop.is_set():
            n += 1
            prompt = HARD if route == "auto" and n % 2 else EASY[n % len(EASY)]
            sent = time.time()
            try:
                c = await client.generate(prompt, max_tokens=8, temperature=0.0, route=route,
                                          no_cache=True)
                self.outcomes.append(Outcome(route, sent, time.time(), "OK", c.served_by.tier,
                                             c.served_by.node_id, c.served_by.model_version))
            except errors.TandemError as e:
                self.outcomes.append(Outcome(route, sent, time.time(), e.status,
                                             detail=e.message))
            except Exception as e:  # counted as a failure, never lost
                self.outcomes.append(Outcome(route, sent, time.time(), "CLIENT_ERROR",
                                             detail=repr(e)))
            # A breath between requests: steady traffic that leaves heartbeats, rollout ticks
            # and the CLI room on two shared cores.
            await asyncio.sleep(0.05)


def edge_versions(outcomes: list[Outcome]) -> dict[str, set[str]]:
    """Edge node id -> the versions it answered with."""
    seen: dict[str, set[str]] = {}
    for o in outcomes:
        if o.status == "OK" and o.tier == "edge":
            seen.setdefault(o.node_id, set()).add(o.version)
    return seen


# --- the fleet ---------------------------------------------------------------------------------


class Fleet:
    """The processes, their data directories and logs, and the CLI against the control plane."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.control_dir = home / "control"
        port = free_port()
        self.control = ManagedProcess(
            "control", tandem_argv("cloud", "control", "serve", "--data-dir",
                                   str(self.control_dir), "--port", str(port), "--no-metrics",
                                   "--grace", "2", *CONTROL_FLAGS),
            home / "control.log", address=f"127.0.0.1:{port}")
        port = free_port()
        self.cloud = ManagedProcess(
            "cloud", tandem_argv("cloud", "serve", "--port", str(port), "--slots", "2",
                                 "--max-queue", "8", "--threads", "1", "--no-metrics"),
            home / "cloud.log", address=f"127.0.0.1:{port}")
        self.node_dirs = [home / f"edge-{i}" for i in range(NODES)]
        self.edges: list[ManagedProcess] = []
        self.router: ManagedProcess | None = None
        self.started: list[ManagedProcess] = []  # in start order; stopped in reverse

    def start(self, process: ManagedProcess) -> ManagedProcess:
        self.started.append(process)
        return process.start()

    def stop(self) -> None:
        stop_all(self.started, timeout_s=20)  # the router first, the control plane last

    def logs(self, lines: int = 25) -> str:
        return "\n".join(f"--- {p.name} ({p.log_path}) ---\n{p.log_tail(lines)}"
                         for p in self.started)

    def check_alive(self) -> None:
        dead = [p for p in self.started if not p.alive]
        assert not dead, f"{', '.join(p.name for p in dead)} exited\n{self.logs(60)}"

    def edge_by_node(self) -> dict[str, ManagedProcess]:
        """Node id (given at enrollment) -> its ``tandem edge run`` process."""
        found = {}
        for p, node_dir in zip(self.edges, self.node_dirs, strict=True):
            node = read_node_config(node_dir)
            assert node is not None, node_dir
            found[node.node_id] = p
        return found

    def cli(self, *args: str) -> str:
        """Run ``tandem ARGS --data-dir CONTROL_DIR``; its stdout (it must succeed)."""
        return run_cli(*args, "--data-dir", str(self.control_dir))

    def nodes(self) -> list[dict[str, Any]]:
        return list(json.loads(self.cli("cloud", "nodes", "--json")))

    def live_nodes(self) -> list[dict[str, Any]] | None:
        """All NODES nodes when each is healthy and heard from within three heartbeats."""
        nodes, now = self.nodes(), time.time()
        return nodes if len(nodes) == NODES and all(
            n["healthy"] and n["last_heartbeat"] and now - n["last_heartbeat"] < 3 * HEARTBEAT_S
            for n in nodes) else None

    def rollout(self) -> dict[str, Any]:
        return dict(json.loads(self.cli("rollout", "status", "--json")))

    def until(self, what: str, probe: Callable[[], T | None], timeout_s: float,
              every_s: float = 0.5, detail: Callable[[], object] = lambda: "") -> T:
        """Poll ``probe`` until it returns something truthy; fail with ``detail`` and the logs
        after ``timeout_s``, or at once when a process dies."""
        end = time.monotonic() + timeout_s
        while True:
            value = probe()
            if value:
                return value
            self.check_alive()
            assert time.monotonic() < end, (
                f"timed out after {timeout_s:.0f} s waiting for {what}: {detail()}\n{self.logs()}")
            time.sleep(every_s)


def build_artifacts(root: Path) -> dict[str, Path]:
    """v1 (int4) and v2 (int8) exports of the demo edge model, and v3: v1 with its ONNX graph
    cut in half and a manifest built over that, so it verifies but cannot load."""
    base = checkpoint_version(EDGE_CHECKPOINT)
    out = {V1: root / "int4", V2: root / "int8"}
    # Each export is a builder subprocess: both at once use both cores.
    with ThreadPoolExecutor(max_workers=2) as pool:
        for f in [pool.submit(export_edge_artifact, EDGE_CHECKPOINT, out[v], q, base)
                  for v, q in ((V1, "int4"), (V2, "int8"))]:
            f.result()
    broken = root / "broken"
    shutil.copytree(out[V1], broken)
    graph = broken / "model.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    m = read_manifest(out[V1])
    write_manifest(broken, build_manifest(broken, model_version=V3, base_version=m.base_version,
                                          quantization=m.quantization, created_by="tests"))
    out[V3] = broken
    return out


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    home = tmp_path_factory.mktemp("fleet")
    f = Fleet(home)
    try:
        # The control plane and the cloud tier boot while the artifacts are exported.
        f.start(f.control)
        f.start(f.cloud)
        artifacts = build_artifacts(home / "artifacts")
        f.control.wait_healthy(120)
        for version in (V1, V2, V3):  # the first published becomes the fleet's version
            f.cli("model", "publish", str(artifacts[version]), "--version", version)
        versions = json.loads(f.cli("model", "versions", "--json"))
        assert [(v["version"], v["current"]) for v in versions] == [
            (V1, True), (V2, False), (V3, False)], versions

        # Three edge nodes, each installed with its own single-use join token.
        tokens = [token_from(f.cli("cloud", "token", "create", "--ttl", "10m"), "join")
                  for _ in range(NODES)]
        ports = [free_port() for _ in range(NODES)]
        with ThreadPoolExecutor(max_workers=NODES) as pool:
            installed = list(pool.map(lambda i: run_cli(
                "edge", "install", "--cloud", f.control.address, "--token", tokens[i],
                "--data-dir", str(f.node_dirs[i]), "--no-systemd", "--port", str(ports[i])),
                range(NODES)))
        for out, node_dir in zip(installed, f.node_dirs, strict=True):
            assert f"model   {V1}" in out and "tandem edge run --data-dir" in out, out
            assert (node_dir / "tandem-edge.service").exists()
            assert (node_dir / "artifacts" / V1 / "manifest.json").exists()
        for i in range(NODES):
            f.edges.append(f.start(ManagedProcess(
                f"edge-{i}",
                tandem_argv("edge", "run", "--data-dir", str(f.node_dirs[i]),
                            "--heartbeat", str(HEARTBEAT_S), "--report-every", "1",
                            "--threads", "1", "--max-concurrency", "2", "--max-queue", "16",
                            "--grace", "3", "--no-metrics"),
                home / f"edge-{i}.log", address=f"127.0.0.1:{ports[i]}")))

        # The router knows only the cloud; the edge nodes it learns from the control plane.
        router_token = token_from(f.cli("cloud", "token", "create", "--router"), "router")
        port = free_port()
        f.router = ManagedProcess(
            "router", tandem_argv("router", "serve", "--port", str(port), "--backend",
                                  f.cloud.address, "--control", f.control.address,
                                  "--discovery-interval", "1", "--no-cache", "--no-rate-limit",
                                  "--ready-timeout", "240", "--no-metrics"),
            home / "router.log", address=f"127.0.0.1:{port}",
            env={"TANDEM_ROUTER_TOKEN": router_token})
        for p in (*f.edges, f.cloud):
            p.wait_healthy(180)
        f.start(f.router).wait_healthy(120)
        yield f
    finally:
        f.stop()


# --- the test ----------------------------------------------------------------------------------


def test_good_version_promoted_bad_version_rolled_back_under_load(fleet: Fleet) -> None:
    assert fleet.router is not None
    ids = check_fleet_on_v1(fleet)
    load = Load(fleet.router.address).start()
    marks = [("load", time.monotonic())]
    try:
        check_router_serves_from(fleet, load, ids, V1, since=0.0)
        marks.append(("v1 answers from all", time.monotonic()))
        canary = check_good_version_promoted(fleet, load)
        marks.append(("v2 promoted", time.monotonic()))
        check_every_node_moves_to(fleet, load, V2)
        marks.append(("v2 everywhere", time.monotonic()))
        check_bad_version_rolled_back(fleet, load)
        marks.append(("v3 rolled back", time.monotonic()))
    finally:
        load.stop()
    outcomes = list(load.outcomes)
    statuses = Counter(o.status for o in outcomes)
    served = Counter((o.route, o.tier) for o in outcomes if o.status == "OK")
    print("\nfleet: " + ", ".join(f"{name} +{t - marks[0][1]:.1f} s" for name, t in marks[1:]))
    print(f"client requests {dict(statuses)}; by route and tier {dict(served)}; by node "
          f"{dict(Counter(o.node_id for o in outcomes))}; first canary {canary}")
    failed = [o for o in outcomes if o.status != "OK"]
    assert not failed, f"{len(failed)} of {len(outcomes)} requests failed: {failed[:5]}"
    assert statuses["OK"] >= 300, statuses
    # Both tiers took part: pinned and easy requests on the edge, hard ones in the cloud.
    assert served[("edge", "edge")] and served[("auto", "edge")] and served[("auto", "cloud")]


def check_fleet_on_v1(fleet: Fleet) -> set[str]:
    """Every node enrolled, live and on v1, and the router health-checks all three."""
    nodes = fleet.until("three live nodes serving v1", lambda: (
        ns if (ns := fleet.live_nodes()) and all(
            (n["served_version"], n["desired_version"]) == (V1, V1) for n in ns) else None),
        60, detail=fleet.nodes)
    ids = {n["node_id"] for n in nodes}
    assert fleet.router is not None
    router_log = fleet.router.log_path

    def discovered() -> bool:
        text = router_log.read_text()
        return (set(re.findall(r"node discovery: adding (\S+) at", text)) == ids
                and set(re.findall(r"is healthy: edge (\S+),", text)) == ids)

    fleet.until("the router to discover and health-check every node", discovered, 60)
    return ids


def check_router_serves_from(fleet: Fleet, load: Load, ids: set[str], version: str,
                             since: float) -> None:
    """Every node answers clients through the router with ``version`` (and only it)."""
    fleet.until(
        f"answers with {version} from every node",
        lambda: {n for n, vs in edge_versions(load.since(since)).items() if vs == {version}}
        == ids, 60, detail=lambda: edge_versions(load.since(since)))


def start_rollout(fleet: Fleet, version: str) -> dict[str, Any]:
    """``tandem rollout start VERSION`` once every node is live; the rollout, one canary."""
    fleet.until("every node live", fleet.live_nodes, 30, detail=fleet.nodes)
    out = fleet.cli("rollout", "start", version, "--fraction", FRACTION)
    assert f"{version} to 1 of " in out, out
    rollout = fleet.rollout()["last_rollout"]
    assert rollout["version"] == version and rollout["state"] == "canary", rollout
    assert len(rollout["canary_node_ids"]) == 1, rollout
    return dict(rollout)


def watch_rollout(fleet: Fleet, rollout_id: int, timeout_s: float,
                  check: Callable[[list[dict[str, Any]]], None]) -> dict[str, Any]:
    """Poll until rollout ``rollout_id`` is decided, with ``check`` on the nodes as seen at
    each poll while it was still in canary; the decided rollout."""

    def decided() -> dict[str, Any] | None:
        nodes = fleet.nodes()  # read before the state: seen while the rollout was in canary
        last = fleet.rollout()["last_rollout"]
        assert last["rollout_id"] == rollout_id, last
        if last["state"] == "canary":
            check(nodes)
            return None
        return dict(last)

    return fleet.until(f"rollout {rollout_id} to be decided", decided, timeout_s, every_s=0.3,
                       detail=lambda: fleet.rollout()["verdict"]["reason"])


def check_good_version_promoted(fleet: Fleet, load: Load) -> str:
    """v2 goes to one canary only, which serves it; the controller promotes it by itself."""
    rollout = start_rollout(fleet, V2)
    [canary] = rollout["canary_node_ids"]
    canary_on_v2: list[bool] = []

    def only_the_canary_moves(nodes: list[dict[str, Any]]) -> None:
        for n in nodes:
            if n["node_id"] == canary:
                assert n["desired_version"] == V2, n
                canary_on_v2.append(n["served_version"] == V2)
            else:
                assert (n["served_version"], n["desired_version"]) == (V1, V1), n

    decided = watch_rollout(fleet, rollout["rollout_id"], LOAD_TIMEOUT_S + 90,
                            only_the_canary_moves)
    assert decided["state"] == "promoted", decided
    assert "not worse than the baseline" in decided["reason"], decided["reason"]
    assert "by operator" not in decided["reason"]
    assert any(canary_on_v2), "the canary was never seen serving v2 before the decision"
    # Until the decision only the canary answered clients with v2, and it did answer them.
    early = {o.node_id for o in load.outcomes
             if o.status == "OK" and o.version == V2 and o.done < decided["decided_at"]}
    assert early == {canary}, early
    return str(canary)


def check_every_node_moves_to(fleet: Fleet, load: Load, version: str) -> None:
    """The control plane sees every node serve ``version``, and so do the clients."""
    fleet.until(f"every node serving {version}", lambda: all(
        (n["served_version"], n["desired_version"]) == (version, version) and n["healthy"]
        for n in fleet.nodes()), 90, detail=fleet.nodes)
    check_router_serves_from(fleet, load, {n["node_id"] for n in fleet.nodes()}, version,
                             since=time.time())


def check_bad_version_rolled_back(fleet: Fleet, load: Load) -> None:
    """v3 cannot load: its canary keeps serving v2 and v3 is rolled back at the load timeout."""
    began = time.time()
    rollout = start_rollout(fleet, V3)
    [canary] = rollout["canary_node_ids"]
    assert rollout["previous_version"] == V2, rollout

    def everyone_stays_on_v2(nodes: list[dict[str, Any]]) -> None:
        assert all(n["served_version"] == V2 for n in nodes), nodes

    decided = watch_rollout(fleet, rollout["rollout_id"], LOAD_TIMEOUT_S + 60,
                            everyone_stays_on_v2)
    assert decided["state"] == "rolled_back", decided
    assert "load timeout" in decided["reason"] and canary in decided["reason"], decided["reason"]
    assert decided["decided_at"] - decided["started_at"] >= LOAD_TIMEOUT_S
    # The canary fetched v3 (signature and hashes fine), failed to load it and kept serving;
    # no other node tried.
    refused = {node for node, p in fleet.edge_by_node().items()
               if f"could not move to model {V3}" in p.log_path.read_text()}
    assert refused == {canary}, fleet.logs(40)
    # The fleet goes on with v2, and no client ever got an answer from v3.
    assert fleet.rollout()["verdict"]["action"] == "idle"
    check_every_node_moves_to(fleet, load, V2)
    assert all(V3 not in vs for vs in edge_versions(load.since(began)).values())
