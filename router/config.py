"""The router's one configuration object, built at the entry point and passed down."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.grpc_server import ServerConfig
from core.request import Limits
from router.backends import PoolConfig
from router.discovery import DiscoveryConfig
from router.frontdoor import FrontDoorConfig
from router.policy import PolicyConfig

# on_escalation(prompt, edge_answer, cloud_answer, edge_node_id): a cascade escalated (a
# training example for that site's next federated round). May return an awaitable; errors are
# logged, never raised.
EscalationHook = Callable[[str, str, str, str], Any]


@dataclass(frozen=True)
class RouterConfig:
    """Backends, listening address, policy, limits and deadlines of one router."""

    backends: Sequence[str] = ()  # "host:port" of edge nodes and cloud replicas
    server: ServerConfig = field(default_factory=ServerConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    limits: Limits = field(default_factory=Limits)
    pool: PoolConfig = field(default_factory=PoolConfig)
    node_id: str = "router"
    # start_router waits this long for a first healthy backend before giving up.
    ready_timeout_s: float = 30.0
    # Deadline of backend calls when the client sets none: nothing waits forever.
    default_timeout_s: float = 120.0
    # Scoring a prompt for difficulty must be cheap; past this the router decides without it.
    score_timeout_s: float = 1.0
    # Longest wait for a backend's first token while another candidate could still answer.
    first_token_timeout_s: float = 30.0
    on_escalation: EscalationHook | None = None
    # API keys, rate limits and the response cache (Redis-backed when redis_url is set).
    front_door: FrontDoorConfig = field(default_factory=FrontDoorConfig)
    # Edge nodes learned from the control plane, beside the static backends (None: static only).
    discovery: DiscoveryConfig | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "backends", tuple(self.backends))
        if not self.backends and self.discovery is None:
            raise ValueError("a router needs at least one backend address (--backend HOST:PORT) "
                             "or a control plane to discover edge nodes from (--control)")
        for address in self.backends:
            host, sep, port = address.rpartition(":")
            if not (host and sep and port.isdigit()):
                raise ValueError(f"backend address must be HOST:PORT, got {address!r}")
        if len(set(self.backends)) != len(self.backends):
            raise ValueError(f"backend addresses repeat: {list(self.backends)}")
