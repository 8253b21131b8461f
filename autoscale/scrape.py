"""Read what the autoscaler needs from the routers' /metrics endpoints.

Straight from the routers rather than through a Prometheus query: the autoscaler then works
where no Prometheus runs (plain Linux hosts), it samples at the steady interval its forecast
needs, and Prometheus stays a consumer of the autoscaler's gauge, not a link in its loop.
Routers count every request once, by the tier that served it (core/metrics.py), so
their counters are the clients' demand and the edge's share of it.
"""

from __future__ import annotations

import socket
import urllib.request
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from prometheus_client.parser import text_string_to_metric_families

GENERATIONS = frozenset({"Generate", "GenerateStream"})
# Served without the cloud: by an edge node, or from the router's response cache.
ABSORBED_TIERS = frozenset({"edge", "cache"})


@dataclass(frozen=True)
class RouterCounters:
    """One router's cumulative counters and its view of the cloud backends, at one scrape."""

    requests_by_tier: dict[str, float] = field(default_factory=dict)
    tokens: float = 0.0
    cloud_backends_up: int = 0
    cloud_queue_depth: float = 0.0

    @property
    def requests(self) -> float:
        return sum(self.requests_by_tier.values())

    @property
    def absorbed(self) -> float:
        return sum(v for t, v in self.requests_by_tier.items() if t in ABSORBED_TIERS)


def parse_router_metrics(text: str) -> RouterCounters:
    """The generation counters by tier, tokens sent, and cloud backends up and queued."""
    by_tier: dict[str, float] = {}
    tokens = queue = 0.0
    up = 0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "tandem_router_requests_total" and s.labels.get("method") in GENERATIONS:
                tier = s.labels.get("tier", "none")
                by_tier[tier] = by_tier.get(tier, 0.0) + s.value
            elif s.name == "tandem_router_generated_tokens_total":
                tokens += s.value
            elif s.labels.get("tier") == "cloud":
                if s.name == "tandem_router_backend_up":
                    up += int(s.value > 0)
                elif s.name == "tandem_router_backend_queue_depth_requests":
                    queue += s.value
    return RouterCounters(by_tier, tokens, up, queue)


def fetch_text(url: str, timeout_s: float) -> str:
    """GET ``url`` and return its body (a /metrics page)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return response.read().decode("utf-8")


def expand_url(url: str) -> list[str]:
    """``url`` once per address its host resolves to (a headless Service names every router
    pod), so that each router is scraped and its counters kept apart."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out = []
    for family, *_, sockaddr in infos:
        addr = f"[{sockaddr[0]}]" if family == socket.AF_INET6 else str(sockaddr[0])
        netloc = f"{addr}:{port}" if port else addr
        candidate = urlunsplit(parts._replace(netloc=netloc))
        if candidate not in out:
            out.append(candidate)
    return out
