"""Federated fine-tuning end to end on real processes, driven through the CLI.

A control plane that starts Flower's SuperLink (``tandem cloud control serve
--superlink-port``), the shipped demo edge model published as the fleet's version, and three
edge nodes installed with join tokens and run with ``tandem edge run --superlink``: each
serves the model and supervises its own SuperNode over a site directory holding a different
family of the demo corpus (non-IID). Then, as an operator would:

* ``tandem fed run --rounds 3``: the global model's held-out perplexity improves on every
  site, the ServerApp publishes the result with its router calibration and the canary node
  serves it (the rollout controller then judges it like any version);
* a run with heavy differential-privacy noise: clipping and noise happen, the model gets
  worse, and the quality gate keeps the current version;
* a run under secure aggregation (SecAgg+): the sum still improves every site;
* a run where one SuperNode is killed mid-round: the round ends with the two other sites'
  results and the run finishes.

Marked slow: several minutes on 2 cores, most of it Flower's per-message process start.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from fleet_cli import run_cli, token_from

from core.launcher import ManagedProcess, free_port, stop_all, tandem_argv
from edge.agent.config import read_node_config
from model.checkpoint import checkpoint_version
from model.demo import DEMO_DIR
from model.export import export_edge_artifact

pytestmark = pytest.mark.slow

SITES = ("text", "numeric", "concurrency")  # small families: quick rounds
V1 = "fed-v1-int4"
# Few local steps: a round is mostly Flower's process starts; this is enough to move the model.
QUICK = ("--set", "local-steps=12", "--set", "batch-size=8", "--set", "seq-len=96")


@dataclass
class Federation:
    home: Path
    control: ManagedProcess
    superlink: str
    node_dirs: list[Path]
    edges: list[ManagedProcess] = field(default_factory=list)

    @property
    def control_dir(self) -> Path:
        return self.home / "control"

    def cli(self, *args: str, timeout_s: float = 120.0) -> str:
        return run_cli(*args, "--data-dir", str(self.control_dir), timeout_s=timeout_s)

    def fed_run(self, *args: str, timeout_s: float = 600.0) -> tuple[str, dict[str, Any]]:
        """``tandem fed run ARGS``; its output and the run's status record."""
        out = self.cli("fed", "run", *args, timeout_s=timeout_s)
        run_id = out.split()[1]
        return out, json.loads(self.cli("fed", "status", run_id, "--json"))

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.log_tail(30)}" for p in [self.control,
                                                                         *self.edges])


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    home = tmp_path_factory.mktemp("federation")
    port, superlink_port = free_port(), free_port()
    control = ManagedProcess(
        "control", tandem_argv("cloud", "control", "serve", "--data-dir", str(home / "control"),
                               "--port", str(port), "--no-metrics", "--grace", "2",
                               "--heartbeat-interval", "1", "--superlink-port",
                               str(superlink_port), "--rollout-interval", "1s"),
        home / "control.log", address=f"127.0.0.1:{port}")
    fed = Federation(home, control, f"127.0.0.1:{superlink_port}",
                     [home / f"edge-{i}" for i in range(len(SITES))])
    started = [control]
    try:
        control.start()
        export_edge_artifact(DEMO_DIR / "edge", home / "v1", "int4",
                             checkpoint_version(DEMO_DIR / "edge"))
        control.wait_healthy(120)
        fed.cli("model", "publish", str(home / "v1"), "--version", V1)
        tokens = [token_from(fed.cli("cloud", "token", "create"), "join") for _ in SITES]
        ports = [free_port() for _ in SITES]
        with ThreadPoolExecutor(max_workers=len(SITES)) as pool:
            list(pool.map(lambda i: run_cli(
                "edge", "install", "--cloud", control.address, "--token", tokens[i],
                "--data-dir", str(fed.node_dirs[i]), "--no-systemd", "--port", str(ports[i])),
                range(len(SITES))))
        for i, family in enumerate(SITES):
            run_cli("fed", "site", "--family", family, "--data-path",
                    str(fed.node_dirs[i] / "federation"))
            fed.edges.append(ManagedProcess(
                f"edge-{i}", tandem_argv("edge", "run", "--data-dir", str(fed.node_dirs[i]),
                                         "--heartbeat", "1", "--threads", "1", "--no-metrics",
                                         "--grace", "2", "--superlink", fed.superlink,
                                         "--fed-port", "0"),
                home / f"edge-{i}.log", address=f"127.0.0.1:{ports[i]}").start())
            started.append(fed.edges[-1])
        for edge in fed.edges:
            edge.wait_healthy(120)
        yield fed
    finally:
        stop_all(started, timeout_s=20)


def site_ppl(status: dict[str, Any], server_round: int) -> dict[str, float]:
    row = next(r for r in status["rounds"] if r["round"] == server_round)
    return {n["site"]: n["eval-ppl"] for n in row["evaluate"]["nodes"].values()}


def test_three_rounds_improve_every_site_and_reach_the_canary(federation: Federation) -> None:
    out, status = federation.fed_run("--rounds", "3", *QUICK)
    assert status["state"] == "finished", (out, federation.logs())
    start, final = site_ppl(status, 0), site_ppl(status, 3)
    assert set(start) == set(final) == set(SITES), status["rounds"]
    for site in SITES:
        assert final[site] < start[site], (site, start, final)
    for row in status["rounds"][1:]:
        assert row["train"]["answered"] == len(SITES), row["train"]
        # Full weights each way: the demo edge model is ~9.4 MB in fp32.
        assert all(n["sent_bytes"] > 5e6 and n["received_bytes"] > 5e6
                   for n in row["train"]["nodes"].values()), row["train"]
    result = status["result"]
    assert result["comparison"]["better"], result
    version = result["published"]
    assert version and result["rollout"] and len(result["canaries"]) == 1, result
    assert f"published {version}" in out and "round 3 evaluate" in out, out

    canary = result["canaries"][0]
    node_dir = next(d for d in federation.node_dirs
                    if (n := read_node_config(d)) is not None and n.node_id == canary)
    end = time.monotonic() + 120
    while (node := read_node_config(node_dir)) is None or node.current_version != version:
        assert time.monotonic() < end, f"canary never served {version}\n{federation.logs()}"
        time.sleep(0.5)
    # The router's new difficulty threshold travelled with the artifact the canary serves.
    calibration = json.loads((node_dir / "artifacts" / version / "calibration.json").read_text())
    assert calibration["difficulty_threshold"] == pytest.approx(
        result["difficulty_threshold"], abs=1e-3)
    nodes = json.loads(federation.cli("cloud", "nodes", "--json"))
    assert {n["node_id"]: n["served_version"] for n in nodes}[canary] in (version, V1)
    rollout = json.loads(federation.cli("rollout", "status", "--json"))
    assert rollout["verdict"]["rollout"]["version"] == version, rollout
    # Later runs start from the published version's checkpoint, kept by the control plane.
    assert (federation.control_dir / "checkpoints").is_dir()
    federation.cli("rollout", "abort", "--reason", "test done")


def test_differential_privacy_noise_is_applied_and_gated(federation: Federation) -> None:
    # Noise this strong wrecks the model: proof that it is applied, and that the quality gate
    # refuses to publish a model worse than the current one.
    out, status = federation.fed_run(
        "--rounds", "1", *QUICK, "--set", "dp-noise-multiplier=2.0", "--set",
        "dp-clipping-norm=0.5", "--set", "min-nodes=3")
    assert status["state"] == "finished", (out, federation.logs())
    start, final = site_ppl(status, 0), site_ppl(status, 1)
    assert all(final[s] > 2 * start[s] for s in SITES), (start, final)
    assert status["result"]["published"] is None
    assert "kept the current version" in status["result"]["publish_skipped"]


def test_secure_aggregation_rounds_improve_the_model(federation: Federation) -> None:
    out, status = federation.fed_run("--rounds", "1", *QUICK, "--set", "secagg=true",
                                     "--set", "min-nodes=3", "--no-publish")
    assert status["state"] == "finished", (out, federation.logs())
    train = next(r for r in status["rounds"] if r["round"] == 1)["train"]
    # Every site's masked update arrived (SecAgg+ takes several exchanges: bytes add up).
    assert train["answered"] == len(SITES), train
    start, final = site_ppl(status, 0), site_ppl(status, 1)
    assert all(final[s] < start[s] for s in SITES), (start, final)


def _supernode_of(node_dir: Path) -> psutil.Process:
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "flower-supernode" in cmdline and str(node_dir / "federation") in cmdline:
            return proc
    raise AssertionError(f"no SuperNode for {node_dir}")


def test_a_supernode_dying_mid_round_leaves_the_run_going(federation: Federation) -> None:
    victim = _supernode_of(federation.node_dirs[2])
    ran: dict[str, Any] = {}

    def run() -> None:
        ran["out"], ran["status"] = federation.fed_run(
            "--rounds", "1", *QUICK, "--set", "min-nodes=2", "--set", "round-timeout=40",
            "--no-publish")

    with ThreadPoolExecutor(max_workers=1) as pool:
        done = pool.submit(run)
        # Kill it (and its ClientApp) once the training round is under way.
        runs = federation.control_dir / "federation" / "runs"
        end = time.monotonic() + 120
        while not any("evaluate" in r for s in runs.glob("*/status.json")
                      for r in json.loads(s.read_text())["rounds"]
                      if json.loads(s.read_text())["state"] == "running"):
            assert time.monotonic() < end, federation.logs()
            time.sleep(0.2)
        os.killpg(victim.pid, signal.SIGKILL)
        done.result(timeout=400)
    status = ran["status"]
    assert status["state"] == "finished", (ran["out"], federation.logs())
    train = next(r for r in status["rounds"] if r["round"] == 1)["train"]
    assert train["answered"] == 2 and len(train["failures"]) == 1, train
    # The edge agent restarted its SuperNode.
    assert _supernode_of(federation.node_dirs[2]).pid != victim.pid
