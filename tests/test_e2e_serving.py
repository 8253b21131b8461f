"""End to end on real processes: cloud tier, two edge nodes and a router, as `tandem up` runs.

Each server is its own process started through the CLI; the client is the SDK. Marked slow:
it starts four Python processes (about 20 s on 2 cores).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from core import errors
from core.launcher import ManagedProcess, free_port, stop_all, tandem_argv
from model.demo import DEMO_DIR
from tandem.client import Client
from tandem.commands.up_cmd import ensure_edge_artifact

pytestmark = pytest.mark.slow

EASY = "Return a new list containing all items from the iterable in ascending order."
HARD = "zq xv 9#@ plk qq zzz ~~ 77 wxq jj ## kk"


class Stack:
    def __init__(self, home: Path) -> None:
        artifact = ensure_edge_artifact(home, DEMO_DIR / "edge", "int4")
        self.cloud = self._proc("cloud", home, "cloud", "serve", "--slots", "2",
                                "--max-queue", "2")
        self.edges = [
            self._proc(f"edge-{i}", home, "edge", "serve", "--artifact", str(artifact),
                       "--node-id", f"edge-{i}", "--threads", "1", "--max-concurrency", "2",
                       "--max-queue", "2")
            for i in (1, 2)
        ]
        backends = [a for p in [self.cloud, *self.edges] for a in ("--backend", p.address)]
        self.router = self._proc("router", home, "router", "serve", *backends)
        self.all = [self.cloud, *self.edges, self.router]

    @staticmethod
    def _proc(name: str, home: Path, *args: str) -> ManagedProcess:
        port = free_port()
        return ManagedProcess(name, tandem_argv(*args, "--port", str(port)),
                              home / f"{name}.log", address=f"127.0.0.1:{port}")

    def start(self) -> None:
        for p in self.all[:-1]:
            p.start()
        for p in self.all[:-1]:
            p.wait_healthy(180)
        self.router.start().wait_healthy(60)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("stack"))
    try:
        s.start()
        yield s
    finally:
        stop_all(s.all)


def test_easy_goes_to_the_edge_and_hard_to_the_cloud(stack: Stack) -> None:
    with Client(stack.router.address, timeout=30) as c:
        easy = c.generate(EASY, max_tokens=16, temperature=0.0)
        hard = c.generate(HARD, max_tokens=16, temperature=0.0)
        streamed = list(c.stream(EASY, max_tokens=16, temperature=0.0))
    assert easy.served_by.tier == "edge", easy.route_reason
    assert hard.served_by.tier == "cloud", hard.route_reason
    assert easy.route_reason and hard.route_reason
    assert "".join(ch.text for ch in streamed) == easy.text
    assert streamed[0].served_by is not None and streamed[0].served_by.tier == "edge"


def test_pinned_routes_are_honoured(stack: Stack) -> None:
    with Client(stack.router.address, timeout=30) as c:
        assert c.generate(EASY, max_tokens=4, route="cloud").served_by.tier == "cloud"
        assert c.generate(HARD, max_tokens=4, route="edge").served_by.tier == "edge"


def test_invalid_request_through_the_router(stack: Stack) -> None:
    with Client(stack.router.address, timeout=30) as c, pytest.raises(errors.InvalidRequest) as e:
        c.generate(EASY, max_tokens=0)
    assert "max_tokens must be" in str(e.value)


def test_killed_edge_nodes_fail_over_to_the_cloud(stack: Stack) -> None:
    for edge in stack.edges:
        edge.kill()
    with Client(stack.router.address, timeout=30) as c:
        for _ in range(3):
            answer = c.generate(EASY, max_tokens=8, temperature=0.0)
            assert answer.served_by.tier == "cloud"


def _tandem_up(tmp_path: Path, port: int, *extra: str) -> tuple[subprocess.Popen[bytes], Path,
                                                                dict[str, str]]:
    env = {**os.environ, "TANDEM_HOME": str(tmp_path)}
    env.pop("TANDEM_API_KEY", None)
    env.pop("TANDEM_MODELS", None)
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen(tandem_argv("up", "--port", str(port), *extra), stdout=out,
                              stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return up, log, env


def _wait_up(up: subprocess.Popen[bytes], log: Path, timeout_s: float) -> str:
    end = time.monotonic() + timeout_s
    while "Tandem is up" not in log.read_text():
        assert up.poll() is None, log.read_text()
        assert time.monotonic() < end, log.read_text()
        time.sleep(0.2)
    text = log.read_text()
    return next(line.split("=", 1)[1] for line in text.splitlines()
                if "export TANDEM_API_KEY=" in line)


def test_tandem_up_and_generate(tmp_path: Path) -> None:
    """The README's demo: `tandem up` in one terminal, `tandem generate` in another."""
    port = free_port()
    up, log, env = _tandem_up(tmp_path, port)

    def generate(*extra: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tandem.cli", "generate", EASY, "--max-tokens", "12",
             "--address", f"127.0.0.1:{port}", *extra],
            capture_output=True, text=True, timeout=60, check=False,
            env={**env, **({"TANDEM_API_KEY": key} if key else {})},
        )

    try:
        key = _wait_up(up, log, 240)
        text = log.read_text()
        denied = generate()
        assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
        # Seeded: at temperature 1 the demo edge model samples EOS first now and then.
        streamed = generate("--stream", "--seed", "0", key=key)
        assert streamed.returncode == 0, streamed.stderr
        assert "served by" in streamed.stderr and streamed.stdout.strip()
        # Greedy twice: the second answer comes from the response cache.
        first = generate("--temperature", "0", key=key)
        again = generate("--temperature", "0", key=key)
        assert first.stdout == again.stdout and "from cache" in again.stderr, again.stderr
        # Every server's metrics endpoint answers (what `curl` on each port shows).
        urls = [line.split("metrics ", 1)[1].split()[0] for line in text.splitlines()
                if " metrics http" in line]
        assert len(urls) == 5  # control plane, cloud, two edge nodes, router
        assert "tandem fed run" in text and "export TANDEM_CONTROL_DIR=" in text
        for url in urls:
            with urllib.request.urlopen(url, timeout=10) as resp:
                assert b"tandem_" in resp.read()
    finally:
        os.killpg(up.pid, signal.SIGINT)
        assert up.wait(60) == 0, log.read_text()
    assert "stopped." in log.read_text()
