"""What an edge agent needs to know: its tunables (``AgentConfig``) and the node's own state,
kept in ``DATA_DIR/node.json`` (``NodeConfig``).

``node.json`` holds the node credential, so it is written mode 0600, to a temporary name,
fsynced and renamed: a crash leaves the old file or the new one, never half of either.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from core.durable import write_atomic

log = logging.getLogger(__name__)

NODE_FILE = "node.json"
ARTIFACTS_DIR = "artifacts"
PARTIAL_DIR = ".partial"
UNIT_NAME = "tandem-edge.service"
# What the cloud accepts as a version name; here it also becomes a directory name, so a
# version from the network must never contain '/' or start with '.'.
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


def check_version_name(version: str) -> None:
    """Raise ValueError unless ``version`` is safe to use as a directory name."""
    if not _VERSION.match(version or ""):
        raise ValueError(f"model version must be 1..128 letters, digits, '.', '_', '+' or '-' "
                         f"(starting with a letter or digit), got {version!r}")


def default_data_dir() -> Path:
    """``/var/lib/tandem-edge`` for root (a system service), else ``~/.tandem/edge``."""
    if os.geteuid() == 0:
        return Path("/var/lib/tandem-edge")
    return Path("~/.tandem/edge").expanduser()


@dataclass(frozen=True)
class AgentConfig:
    """How an agent talks to the cloud: periods, timeouts and retry backoff."""

    data_dir: Path
    # Until the cloud says otherwise (Enroll and every Heartbeat reply carry an interval).
    heartbeat_s: float = 5.0
    # Outcome reports (requests, errors, latency per version) feed canary decisions.
    report_s: float = 15.0
    rpc_timeout_s: float = 10.0
    # Control-plane errors are retried after backoff_min_s, doubling up to backoff_max_s.
    backoff_min_s: float = 1.0
    backoff_max_s: float = 60.0
    # A version that failed to download, verify or load is retried no sooner than this
    # (doubling per failure): a bad artifact must not be fetched again every heartbeat.
    failed_version_retry_s: float = 30.0
    # Resumed attempts per file within one download before it counts as truncated.
    fetch_attempts: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser().resolve())
        for name in ("heartbeat_s", "report_s", "rpc_timeout_s", "backoff_min_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.backoff_max_s < self.backoff_min_s:
            raise ValueError("backoff_max_s must be >= backoff_min_s")
        if self.fetch_attempts < 1:
            raise ValueError(f"fetch_attempts must be >= 1, got {self.fetch_attempts}")

    @property
    def node_file(self) -> Path:
        return self.data_dir / NODE_FILE

    @property
    def artifacts_dir(self) -> Path:
        """``<version>/`` per downloaded version, and ``.partial/`` for downloads under way."""
        return self.data_dir / ARTIFACTS_DIR

    def artifact(self, version: str) -> Path:
        check_version_name(version)
        return self.artifacts_dir / version


@dataclass(frozen=True)
class NodeConfig:
    """An enrolled node: who it is, how it reaches the cloud, what it serves (``node.json``)."""

    cloud: str  # host:port of the control service
    node_id: str
    credential: str  # secret: "authorization: Bearer <credential>" on every control call
    manifest_public_key: str  # PEM of the Ed25519 key that signs artifact manifests
    inference_address: str  # host:port where routers reach this node (as enrolled)
    listen_host: str = "127.0.0.1"
    listen_port: int = 50061
    current_version: str = ""  # "" until a first version is downloaded
    previous_version: str = ""  # kept on disk for rollback

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: Path | str = NODE_FILE) -> NodeConfig:
        try:
            raw = json.loads(text)
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in raw.items() if k in known})
        except (ValueError, TypeError) as e:
            raise ValueError(f"{source} is not a valid node config ({e}); re-run "
                             "`tandem edge install` with a new join token") from e


def read_node_config(data_dir: Path) -> NodeConfig | None:
    """The node's config, or None when the node was never installed into ``data_dir``."""
    path = Path(data_dir) / NODE_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("%s holds the node credential but is readable by others (mode %o); "
                    "chmod 600 it", path, mode)
    return NodeConfig.from_json(text, path)


def write_node_config(data_dir: Path, node: NodeConfig) -> Path:
    """Write ``node.json`` atomically, mode 0600 from its first byte."""
    data_dir = Path(data_dir)
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = data_dir / NODE_FILE
    # 0600 from its first byte: the credential is never readable by others, even briefly.
    write_atomic(target, node.to_json(), mode=0o600)
    return target
