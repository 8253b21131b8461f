"""Flower's processes as Tandem runs them: the SuperLink beside the control plane, a SuperNode
beside each edge node, each supervised (restarted when it dies, stopped with its host).

Every Flower process gets its own ``FLWR_HOME``, telemetry and update checks off, and never
installs dependencies at run time (the SuperLink would otherwise ``uv sync`` the app's
dependencies, pulling a CUDA torch of several GB). Output goes to a log file, not a pipe: a
SuperNode's ClientApp children inherit it and would keep a pipe open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

SUPERLINK_PORT = 8000  # one port: Fleet, Control and ServerApp APIs, and /health
SUPERNODE_PORT = 9094  # a SuperNode's local runtime API


def flower_bin(name: str) -> str:
    """A Flower console script of this interpreter (PATH may not hold its bin directory)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} is not installed; install Tandem with the federation "
                                "extra: pip install 'tandem[federation]'")
    return found


def flower_env(home: Path, threads: int | None = None) -> dict[str, str]:
    """The environment of a Flower process whose state lives in ``home`` (and whose torch
    uses ``threads`` threads, when given)."""
    home.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "PATH": path, "PYTHONUNBUFFERED": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


@dataclass(frozen=True)
class FlowerTls:
    """Transport security of Flower's links, and SuperNode authentication (which needs TLS).

    Without ``ca_cert`` everything runs insecure (a lab or loopback). With it, the SuperLink
    serves ``server_cert``/``server_key`` (its SAN must name the address nodes dial, e.g.
    IP:127.0.0.1) and SuperNodes verify it against ``ca_cert``. ``supernode_auth`` makes the
    SuperLink accept only SuperNodes whose public keys were registered
    (``flwr supernode register``); each such node signs with ``supernode_key``.
    """

    ca_cert: Path | None = None
    server_cert: Path | None = None
    server_key: Path | None = None
    supernode_auth: bool = False
    supernode_key: Path | None = None

    def __post_init__(self) -> None:
        # Flower processes run in their own state directories: relative paths would break.
        for name in ("ca_cert", "server_cert", "server_key", "supernode_key"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value).expanduser().resolve())
        if (self.server_cert is None) != (self.server_key is None):
            raise ValueError("a TLS certificate needs its key, and the key its certificate")
        if self.supernode_auth and self.ca_cert is None:
            raise ValueError("SuperNode authentication needs TLS (a CA certificate)")

    @property
    def insecure(self) -> bool:
        return self.ca_cert is None


@dataclass(frozen=True)
class SuperLinkConfig:
    """The federation's SuperLink: where it listens and keeps its state."""

    state_dir: Path
    host: str = "127.0.0.1"
    port: int = SUPERLINK_PORT
    tls: FlowerTls = field(default_factory=FlowerTls)

    @property
    def address(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"{host}:{self.port}"

    def argv(self) -> list[str]:
        argv = [flower_bin("flower-superlink"), "--host", self.host, "--port", str(self.port),
                "--database", str(self.state_dir / "superlink.db"),
                "--disable-runtime-dependency-installation"]
        if self.tls.insecure:
            return [*argv, "--insecure"]
        argv += ["--ssl-ca-certfile", str(self.tls.ca_cert)]
        if self.tls.server_cert is not None:
            argv += ["--ssl-certfile", str(self.tls.server_cert),
                     "--ssl-keyfile", str(self.tls.server_key)]
        return [*argv, "--enable-supernode-auth"] if self.tls.supernode_auth else argv

    def health_url(self) -> str:
        scheme = "http" if self.tls.insecure else "https"
        return f"{scheme}://{self.address}/health"


@dataclass(frozen=True)
class SuperNodeConfig:
    """One site's SuperNode: the SuperLink it joins and the data directory it trains on."""

    superlink: str  # host:port
    data_path: Path
    state_dir: Path
    port: int = SUPERNODE_PORT
    tls: FlowerTls = field(default_factory=FlowerTls)
    # Training threads of the ClientApp: it shares the node with serving, which must stay
    # responsive, and a round's few local steps gain little from more.
    threads: int = 1

    def argv(self) -> list[str]:
        argv = [flower_bin("flower-supernode"), "--superlink", self.superlink,
                "--port", str(self.port),
                "--node-config", f'data-path="{Path(self.data_path).resolve()}"']
        if self.tls.insecure:
            return [*argv, "--insecure"]
        argv += ["--root-certificates", str(self.tls.ca_cert)]
        if self.tls.supernode_key is not None:
            argv += ["--auth-supernode-private-key", str(self.tls.supernode_key)]
        return argv

    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/health"


def http_healthy(url: str, ca_cert: Path | None = None) -> bool:
    """Whether ``url`` answers 200 within a second."""
    import ssl

    context = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else None
    try:
        with urllib.request.urlopen(url, timeout=1.0, context=context) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class FlowerProcess:
    """One Flower process kept running: started in its own session with output to a log
    file, restarted with backoff when it exits, stopped (its children too) on ``stop``."""

    def __init__(self, name: str, argv: list[str], home: Path, log_path: Path,
                 health_url: str, ca_cert: Path | None = None, *,
                 backoff_s: tuple[float, float] = (1.0, 60.0), threads: int | None = None
                 ) -> None:
        self.name, self.argv, self.home, self.log_path = name, argv, home, log_path
        self.health_url, self.ca_cert, self.threads = health_url, ca_cert, threads
        self.backoff_min_s, self.backoff_max_s = backoff_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def start(self) -> FlowerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=flower_env(self.home, self.threads), cwd=self.home,
                start_new_session=True)
        log.info("started %s (pid %d), log %s", self.name, self.proc.pid, self.log_path)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        return self.alive and http_healthy(self.health_url, self.ca_cert)

    def wait_healthy(self, timeout_s: float = 60.0) -> None:
        """Poll ``/health``; fail fast, with the log's tail, if the process dies."""
        end = time.monotonic() + timeout_s
        while not self.healthy():
            if not self.alive:
                raise RuntimeError(f"{self.name} exited ({self._code()}):\n{self.log_tail()}")
            if time.monotonic() > end:
                raise TimeoutError(f"{self.name} not healthy after {timeout_s:.0f} s:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.2)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``timeout_s``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing it", self.name, timeout_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        # The ClientApp/ServerApp children share the group; sweep any straggler.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    async def supervise(self, poll_s: float = 1.0) -> None:
        """Keep the process running until cancelled, then stop it."""
        delay = self.backoff_min_s
        try:
            if not self.alive:
                self.start()
            started = time.monotonic()
            while True:
                await asyncio.sleep(poll_s)
                if self.alive:
                    if time.monotonic() - started > self.backoff_max_s:
                        delay = self.backoff_min_s  # ran a while: the next crash is news
                    continue
                log.warning("%s exited (%s); restarting in %.0f s. Last lines:\n%s", self.name,
                            self._code(), delay, self.log_tail(10))
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max_s)
                self.restarts += 1
                self.start()
                started = time.monotonic()
        finally:
            await asyncio.to_thread(self.stop)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _code(self) -> str:
        return f"code {self.proc.returncode}" if self.proc is not None else "never started"


def superlink_process(config: SuperLinkConfig) -> FlowerProcess:
    config.state_dir.mkdir(parents=True, exist_ok=True)
    return FlowerProcess("flower-superlink", config.argv(), config.state_dir / "home",
                         config.state_dir / "superlink.log", config.health_url(),
                         config.tls.ca_cert)


def supernode_process(config: SuperNodeConfig) -> FlowerProcess:
    config.state_dir.mkdir(parents=True, exist_ok=True)
    return FlowerProcess("flower-supernode", config.argv(), config.state_dir / "home",
                         config.state_dir / "supernode.log", config.health_url(),
                         threads=config.threads)
