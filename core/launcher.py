"""Start Tandem servers as child processes, wait until they are healthy, stop them cleanly.

Used by ``tandem up``, the end-to-end tests and the benchmarks. Children write their logs to
files (never pipes a child could block on) and run in their own session, so one SIGTERM to the
group drains a server and everything it started.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now (another process could take it before it is bound)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def tandem_argv(*args: str) -> list[str]:
    """Run the ``tandem`` CLI of this interpreter (works without the console script on PATH)."""
    return [sys.executable, "-m", "tandem.cli", *args]


@dataclass
class ManagedProcess:
    name: str
    argv: Sequence[str]
    log_path: Path
    address: str | None = None
    metrics_url: str | None = None
    env: dict[str, str] | None = None
    cpus: Sequence[int] | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cpus = self.cpus
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                list(self.argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env={**os.environ, **(self.env or {})},
                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
            )
        log.info("started %s (pid %d), log %s", self.name, self.proc.pid, self.log_path)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_healthy(self, timeout_s: float = 120.0, service: str = "") -> None:
        """Poll grpc.health.v1 until SERVING; fail fast, with the log, if the child dies."""
        assert self.address, f"{self.name} has no address to check"
        end = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if not self.alive:
                    raise RuntimeError(
                        f"{self.name} exited with code {self.proc.returncode if self.proc else '?'}"
                        f" before it was healthy; its log ({self.log_path}):\n{self.log_tail()}"
                    )
                try:
                    # types-grpcio-health-checking declares HealthStub without its methods.
                    resp = stub.Check(  # type: ignore[attr-defined]
                        health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > end:
                    raise TimeoutError(
                        f"{self.name} at {self.address} not healthy after {timeout_s:.0f} s; "
                        f"its log ({self.log_path}):\n{self.log_tail()}"
                    )
                time.sleep(0.1)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM (graceful drain), then SIGKILL after ``timeout_s``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", self.name, timeout_s)
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        return self.proc.returncode

    def kill(self) -> None:
        """Abrupt death (tests of failover): SIGKILL the whole process group."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def stop_all(processes: Sequence[ManagedProcess], timeout_s: float = 15.0) -> None:
    """Stop in reverse start order (the router first, so nothing routes to a stopped tier)."""
    for p in reversed(processes):
        p.stop(timeout_s)
