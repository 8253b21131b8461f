"""The control plane's configuration: one frozen dataclass, built at the entry point."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from core.grpc_server import ServerConfig
from core.metrics import MetricsConfig


@dataclass(frozen=True)
class ControlConfig:
    """Where the control plane keeps its state and listens, and what it tells nodes."""

    data_dir: Path
    server: ServerConfig = field(default_factory=ServerConfig)
    # How often nodes heartbeat: also how fast a rollout reaches them and how soon a dead node
    # is noticed.
    heartbeat_interval_s: float = 5.0
    # Default lifetime of a join token from `tandem cloud token create`.
    token_ttl_s: float = 3600.0
    # FetchArtifact chunk size: 1 MiB stays well under gRPC's default 4 MiB message limit.
    chunk_bytes: int = 1 << 20
    # Off unless asked: programmatic servers (tests) share one process and one host.
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def __post_init__(self) -> None:
        if not 0.1 <= self.heartbeat_interval_s <= 3600:
            raise ValueError(f"heartbeat interval must be 0.1..3600 s, got "
                             f"{self.heartbeat_interval_s}")
        if self.token_ttl_s <= 0:
            raise ValueError(f"token ttl must be > 0 s, got {self.token_ttl_s}")
        if not 1024 <= self.chunk_bytes <= 4 << 20:
            raise ValueError(f"chunk_bytes must be 1 KiB..4 MiB, got {self.chunk_bytes}")

    @property
    def heartbeat_interval_ms(self) -> int:
        return round(self.heartbeat_interval_s * 1000)
