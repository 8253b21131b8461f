"""``tandem edge install``: enroll with a join token, fetch and verify the current model, and
write the systemd unit that runs ``tandem edge run``.

Safe to run again on an enrolled node: with a fresh token it re-enrolls under the same node id
(a new credential); with the spent one it keeps the enrollment it has, as long as that
credential still works. Downloaded versions stay; a version already on disk is not fetched.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from edge.agent.client import ControlClient, ControlError
from edge.agent.config import (
    UNIT_NAME,
    AgentConfig,
    NodeConfig,
    read_node_config,
    write_node_config,
)
from edge.agent.download import download_version

log = logging.getLogger(__name__)

SYSTEMD_DIR = Path("/etc/systemd/system")


class InstallError(Exception):
    """Install cannot go on; the message says what to do."""


@dataclass(frozen=True)
class InstallResult:
    node: NodeConfig
    artifact: Path | None  # None when the cloud has no edge model published yet
    unit_path: Path
    unit_enabled: bool  # installed into systemd and started; else written for the user
    kept_enrollment: bool  # the token was refused but the existing credential works


def advertised_address(host: str, port: int) -> str:
    """Where routers reach this node: the bind host, or this host's name for 0.0.0.0."""
    if host in ("0.0.0.0", "::", ""):
        return f"{socket.getfqdn()}:{port}"
    return f"{host}:{port}"


async def install(
    cloud: str,
    token: str,
    data_dir: Path,
    no_systemd: bool = False,
    *,
    host: str = "127.0.0.1",
    port: int = 50061,
    advertise: str | None = None,
    config: AgentConfig | None = None,
) -> InstallResult:
    """Enroll this machine as an edge node of ``cloud`` and prepare ``data_dir`` to serve."""
    config = config or AgentConfig(data_dir=data_dir)
    data_dir = config.data_dir
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    existing = read_node_config(data_dir)
    address = advertise or advertised_address(host, port)
    async with ControlClient(cloud, timeout_s=config.rpc_timeout_s) as client:
        node, desired, kept = await _enroll(client, cloud, token, address, existing)
        node = dataclasses.replace(node, listen_host=host, listen_port=port)
        # The token is spent: the credential goes to disk before anything else can fail.
        write_node_config(data_dir, node)
        log.info("node %s enrolled with %s (serves at %s); config in %s", node.node_id, cloud,
                 address, config.node_file)
        artifact = None
        if desired:
            artifact, _ = await download_version(client, desired, config.artifacts_dir,
                                                 node.manifest_public_key,
                                                 attempts=config.fetch_attempts)
            if desired != node.current_version:
                node = dataclasses.replace(node, current_version=desired,
                                           previous_version=node.current_version)
                write_node_config(data_dir, node)
        elif node.current_version:
            artifact = config.artifact(node.current_version)
        else:
            log.warning("the cloud has no edge model published yet; `tandem edge run` will "
                        "fetch one as soon as there is")
    unit_path, enabled = write_unit(data_dir, no_systemd)
    return InstallResult(node, artifact, unit_path, enabled, kept)


async def _enroll(
    client: ControlClient, cloud: str, token: str, address: str, existing: NodeConfig | None
) -> tuple[NodeConfig, str, bool]:
    """``(node config, version to serve, kept the existing enrollment)``."""
    # Re-enroll under our own id only with the cloud that issued it.
    same_cloud = existing is not None and existing.cloud == cloud
    node_id = existing.node_id if existing is not None and same_cloud else ""
    try:
        enrolled = await client.enroll(token, address, node_id=node_id)
    except ControlError as e:
        if e.code != "UNAUTHENTICATED" or existing is None or not same_cloud:
            raise InstallError(f"enrollment with {cloud} failed: {e.details or e}") from e
        return existing, await _check_credential(client, existing, e), True
    client.credential = enrolled.credential
    if node_id:
        log.info("re-enrolled node %s with a new credential", enrolled.node_id)
    current = existing.current_version if existing is not None and same_cloud else ""
    previous = existing.previous_version if existing is not None and same_cloud else ""
    node = NodeConfig(
        cloud=cloud,
        node_id=enrolled.node_id,
        credential=enrolled.credential,
        manifest_public_key=enrolled.manifest_public_key,
        inference_address=address,
        current_version=current,
        previous_version=previous,
    )
    return node, enrolled.model_version, False


async def _check_credential(client: ControlClient, node: NodeConfig, refused: ControlError) -> str:
    """The version to serve, if ``node``'s credential still works; else InstallError."""
    client.credential = node.credential
    try:
        # healthy=False: install doesn't know whether `tandem edge run` is up; if it is, its
        # next heartbeat corrects this within one interval.
        desired, _ = await client.heartbeat(node.node_id, node.current_version, "", 0, 0, 0.0,
                                            healthy=False)
    except ControlError as e:
        raise InstallError(
            f"the join token was refused ({refused.details}) and node {node.node_id}'s "
            f"credential no longer works ({e.details}); create a new join token") from e
    log.info("join token refused (%s); node %s is already enrolled and its credential works: "
             "keeping it", refused.details, node.node_id)
    return desired


def tandem_command() -> list[str]:
    """How systemd should start this installation's ``tandem``."""
    script = Path(sys.executable).parent / "tandem"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    found = shutil.which("tandem")
    return [found] if found else [sys.executable, "-m", "tandem.cli"]


def unit_text(data_dir: Path) -> str:
    """The systemd unit of ``tandem edge run`` for ``data_dir``."""
    exec_start = shlex.join([*tandem_command(), "edge", "run", "--data-dir", str(data_dir)])
    return f"""[Unit]
Description=Tandem edge node (inference and agent)
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
ExecStart={exec_start}
Environment=PYTHONUNBUFFERED=1
# SIGTERM drains: health NOT_SERVING, accepted requests finish, then exit.
KillSignal=SIGTERM
TimeoutStopSec=30
Restart=on-failure
RestartSec=5

[Install]
WantedBy=multi-user.target
"""


def _systemd_available() -> bool:
    return Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None


def write_unit(data_dir: Path, no_systemd: bool) -> tuple[Path, bool]:
    """Install and start the unit when root on a systemd host; else write it into data_dir."""
    text = unit_text(data_dir)
    if not no_systemd and os.geteuid() == 0 and _systemd_available():
        path = SYSTEMD_DIR / UNIT_NAME
        path.write_text(text)
        for cmd in (["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", UNIT_NAME]):
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise InstallError(f"`{' '.join(cmd)}` failed: {done.stderr.strip()}")
        log.info("installed and started %s", path)
        return path, True
    path = data_dir / UNIT_NAME
    path.write_text(text)
    return path, False


def unit_hint(path: Path) -> str:
    """How to install a unit written into the data directory."""
    return (f"sudo cp {path} {SYSTEMD_DIR / UNIT_NAME} && sudo systemctl daemon-reload && "
            f"sudo systemctl enable --now {UNIT_NAME}")
