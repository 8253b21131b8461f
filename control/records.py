"""Plain records the control store hands out: no secrets, no SQLite rows, no protobufs."""

from __future__ import annotations

from dataclasses import dataclass

ROLLOUT_STATES = ("canary", "promoted", "rolled_back", "aborted")
# States a rollout ends in; only a rollout in "canary" can move to one of them.
FINAL_STATES = ("promoted", "rolled_back", "aborted")


@dataclass(frozen=True)
class NodeResources:
    """What a node reported about its hardware at enrollment."""

    cpu_cores: int = 0
    memory_bytes: int = 0
    cpu_features: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodeLoad:
    """A node's load at its last heartbeat."""

    in_flight: int = 0
    queue_depth: int = 0
    tokens_per_second: float = 0.0


@dataclass(frozen=True)
class Enrollment:
    """What Enroll answers: the node's id, its new credential (shown once) and its version."""

    node_id: str
    credential: str
    # The version the node should serve now; "" when none is published yet.
    model_version: str
    reenrolled: bool


@dataclass(frozen=True)
class JoinToken:
    """A join token as listed (never its secret)."""

    token_id: str
    created_at: float
    expires_at: float
    used_at: float | None
    used_by: str | None
    note: str


@dataclass(frozen=True)
class NodeRecord:
    """An enrolled node and what its last heartbeat said."""

    node_id: str
    hostname: str
    inference_address: str
    resources: NodeResources
    enrolled_at: float
    last_enrolled_at: float
    last_heartbeat: float | None
    served_version: str | None
    loading_version: str | None
    healthy: bool
    load: NodeLoad
    # A per-node override set by a rollout (None: follow the fleet's current version).
    target_version: str | None
    # What Heartbeat answers: the override, else the fleet's current version ("" if none).
    desired_version: str

    def is_live(self, now: float, max_age_s: float) -> bool:
        """Heard from within ``max_age_s`` and healthy by its own account."""
        return (self.healthy and self.last_heartbeat is not None
                and now - self.last_heartbeat <= max_age_s)


@dataclass(frozen=True)
class ModelVersion:
    """A published edge model version: its signed manifest and where the artifact store has it."""

    version: str
    # The manifest's path inside the artifact store (its blobs are named by sha256).
    manifest_path: str
    # Canonical manifest bytes, exactly what was signed and what nodes receive.
    manifest_json: bytes
    manifest_sha256: str
    signature: bytes
    key_id: str
    # The checkpoint version the artifact was exported from (from the manifest).
    base_version: str
    # The fleet version this one was published on top of (lineage), if any.
    parent_version: str | None
    quantization: str
    total_size: int
    created_at: float
    notes: str


@dataclass(frozen=True)
class Rollout:
    """A canary rollout of ``version`` and, once decided, how it ended."""

    rollout_id: int
    version: str
    # The fleet's current version when the rollout started (what canaries return to).
    previous_version: str | None
    canary_node_ids: tuple[str, ...]
    fraction: float
    state: str
    started_at: float
    decided_at: float | None
    reason: str


@dataclass(frozen=True)
class VersionOutcome:
    """A node's serving outcomes for one version over a report's window."""

    version: str
    requests: int = 0
    errors: int = 0
    escalations: int = 0
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0


@dataclass(frozen=True)
class OutcomeWindow:
    """What one node reported about serving one version over one window."""

    node_id: str
    version: str
    reported_at: float
    window_s: float
    requests: int
    errors: int
    escalations: int
    latency_p50_ms: float
    latency_p99_ms: float
