"""Starting, watching and stopping federated runs from the cloud host (``tandem fed``).

A run is submitted to the SuperLink with Flower's own CLI (``flwr run``), pointed at a
connection in a private ``FLWR_HOME``; the SuperLink's address and TLS settings come from
``<control-dir>/flower/superlink.json``, which the control plane writes when it starts the
SuperLink. Progress is read from the run's ``status.json`` (written by the ServerApp) and from
``flwr list``.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from federation.processes import FlowerTls, flower_bin, flower_env
from federation.recording import STATUS_FILE

log = logging.getLogger(__name__)

FLOWER_DIR = "flower"
LINK_FILE = "superlink.json"
RUNS_DIR = Path("federation") / "runs"
APP_DIR = Path(__file__).resolve().parent
CONNECTION = "tandem"
FINISHED = "finished"


@dataclass(frozen=True)
class LinkInfo:
    """How to reach the SuperLink's Control API."""

    address: str
    ca_cert: str = ""

    def save(self, control_dir: Path) -> Path:
        path = Path(control_dir) / FLOWER_DIR / LINK_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, control_dir: Path) -> LinkInfo:
        path = Path(control_dir) / FLOWER_DIR / LINK_FILE
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no SuperLink recorded in {path}: start the control plane with "
                "`tandem cloud control serve --superlink-port 8000`, or pass "
                "--superlink HOST:PORT") from None

    @classmethod
    def of(cls, address: str, tls: FlowerTls) -> LinkInfo:
        return cls(address, str(tls.ca_cert) if tls.ca_cert else "")


class FlowerCli:
    """Flower's ``flwr`` CLI with a connection named ``tandem`` in its own ``FLWR_HOME``."""

    def __init__(self, link: LinkInfo, home: Path) -> None:
        self.link, self.home = link, Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        tls = (f'root-certificates = "{link.ca_cert}"\n' if link.ca_cert
               else "insecure = true\n")
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{link.address}"\n{tls}')

    def _flwr(self, *args: str, timeout_s: float = 60.0) -> dict[str, Any]:
        proc = subprocess.run([flower_bin("flwr"), *args, "--format", "json"],
                              capture_output=True, text=True, timeout=timeout_s,
                              env=flower_env(self.home), cwd=self.home)
        # flwr prints its JSON on stdout, warnings around it.
        text = proc.stdout[proc.stdout.find("{"):] if "{" in proc.stdout else ""
        try:
            out = json.loads(text)
        except ValueError:
            out = {}
        if proc.returncode != 0 or not out.get("success", False):
            detail = out.get("error-message") or (proc.stderr or proc.stdout).strip()[-800:]
            raise RuntimeError(f"flwr {args[0]} failed: {detail}")
        return out

    def submit(self, run_config: dict[str, Any], app_dir: Path = APP_DIR) -> int:
        """Start a run of the app with ``run_config`` overrides; its run id."""
        overrides = " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())
        out = self._flwr("run", str(app_dir), CONNECTION, "--run-config", overrides)
        return int(out["run-id"])

    def runs(self) -> list[dict[str, Any]]:
        return list(self._flwr("list", CONNECTION)["runs"])

    def run_info(self, run_id: int) -> dict[str, Any] | None:
        return next((r for r in self.runs() if int(r["run-id"]) == run_id), None)

    def stop(self, run_id: int) -> None:
        self._flwr("stop", str(run_id), CONNECTION)

    def register_supernode(self, public_key: Path, name: str = "") -> dict[str, Any]:
        """Let the SuperNode holding ``public_key``'s private half join an authenticating
        SuperLink."""
        extra = ("--name", name) if name else ()
        return self._flwr("supernode", "register", str(Path(public_key).resolve()),
                          CONNECTION, *extra)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string is JSON-compatible


def parse_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` from the command line, VALUE read as TOML (bare words as strings)."""
    import tomllib

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key.strip(), parsed


def runs_dir(control_dir: Path) -> Path:
    return Path(control_dir) / RUNS_DIR


def run_status(control_dir: Path, run_id: int) -> dict[str, Any] | None:
    path = runs_dir(control_dir) / str(run_id) / STATUS_FILE
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def all_statuses(control_dir: Path) -> list[dict[str, Any]]:
    """Every recorded run, oldest first."""
    out = []
    root = runs_dir(control_dir)
    for path in root.glob(f"*/{STATUS_FILE}") if root.is_dir() else []:
        try:
            out.append(json.loads(path.read_text()))
        except ValueError:
            continue
    return sorted(out, key=lambda s: s.get("started_at", 0))


def wait_for_run(cli: FlowerCli, control_dir: Path, run_id: int, deadline_s: float,
                 on_progress: Callable[[dict[str, Any]], None] | None = None,
                 poll_s: float = 2.0) -> dict[str, Any]:
    """Poll until the run ends (or stop it at the deadline); its final status record."""
    end = time.monotonic() + deadline_s
    seen = ""
    while True:
        status = run_status(control_dir, run_id) or {}
        key = json.dumps([status.get("state"), len(status.get("rounds", [])),
                          [sorted(r) for r in status.get("rounds", [])]])
        if status and key != seen and on_progress is not None:
            on_progress(status)
        seen = key
        if status.get("state") in (FINISHED, "failed"):
            return status
        info = cli.run_info(run_id)
        flower_state = str(info.get("status", "")) if info else ""
        if flower_state.startswith("finished"):
            # Flower ended the run without our record saying so: the ServerApp died.
            time.sleep(poll_s)
            status = run_status(control_dir, run_id) or {}
            if status.get("state") not in (FINISHED, "failed"):
                status = {**status, "state": "failed",
                          "error": f"Flower reports {flower_state}; see the SuperLink log"}
            return status
        if time.monotonic() > end:
            cli.stop(run_id)
            return {**status, "state": "failed",
                    "error": f"stopped after the deadline of {deadline_s:.0f} s"}
        time.sleep(poll_s)
