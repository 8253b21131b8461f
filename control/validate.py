"""Checks on what nodes send, before anything is written; each failure says what to change."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from control import credentials
from control.records import NodeLoad, NodeResources, VersionOutcome
from core.errors import InvalidRequest

# Version names become file names in the artifact store and on nodes.
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
MAX_OUTCOMES_PER_REPORT = 64
# A report covers at most a day: longer windows would blur a canary's comparison anyway.
MAX_WINDOW_S = 86_400.0


def check_version_name(version: str) -> None:
    if not _VERSION.match(version or ""):
        raise InvalidRequest(
            f"model version must be 1..128 letters, digits, '.', '_', '+' or '-' (starting "
            f"with a letter or digit), got {version!r}")


def _check_optional_version(name: str, value: str) -> None:
    if value and not _VERSION.match(value):
        raise InvalidRequest(f"{name} must be a model version name or empty, got {value!r}")


def check_address(address: str) -> None:
    """``host:port`` (``[v6]:port`` too), port 1..65535."""
    host, sep, port = (address or "").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or len(address) > 255:
        raise InvalidRequest(
            f"inference_address must be host:port where routers reach the node's Inference "
            f"service, got {address!r}")


def check_enrollment(hostname: str, inference_address: str, resources: NodeResources,
                     node_id: str) -> None:
    if not hostname or len(hostname) > 255 or not hostname.isprintable():
        raise InvalidRequest(f"hostname must be 1..255 printable characters, got {hostname!r}")
    check_address(inference_address)
    if node_id and not credentials.is_node_id(node_id):
        raise InvalidRequest(
            f"node_id must be 1..64 letters, digits, '.', '_' or '-', got {node_id!r}; leave "
            "it empty on a first enrollment")
    if resources.cpu_cores < 0 or resources.memory_bytes < 0:
        raise InvalidRequest("resources must not be negative")
    if len(resources.cpu_features) > 256 or any(
            not f or len(f) > 64 for f in resources.cpu_features):
        raise InvalidRequest("cpu_features must be at most 256 names of 1..64 characters")


def check_heartbeat(served_version: str, loading_version: str, load: NodeLoad) -> None:
    _check_optional_version("model_version", served_version)
    _check_optional_version("loading_version", loading_version)
    if load.in_flight < 0 or load.queue_depth < 0:
        raise InvalidRequest("load.in_flight and load.queue_depth must not be negative")
    if not (math.isfinite(load.tokens_per_second) and load.tokens_per_second >= 0):
        raise InvalidRequest(
            f"load.tokens_per_second must be finite and >= 0, got {load.tokens_per_second}")


def check_outcomes(window_s: float, outcomes: Sequence[VersionOutcome]) -> None:
    if not (math.isfinite(window_s) and 0 < window_s <= MAX_WINDOW_S):
        raise InvalidRequest(f"window_s must be in (0, {MAX_WINDOW_S:g}], got {window_s}")
    if len(outcomes) > MAX_OUTCOMES_PER_REPORT:
        raise InvalidRequest(f"a report holds at most {MAX_OUTCOMES_PER_REPORT} versions, "
                             f"got {len(outcomes)}")
    seen: set[str] = set()
    for o in outcomes:
        check_version_name(o.version)
        if o.version in seen:
            raise InvalidRequest(f"version {o.version} appears twice in one report")
        seen.add(o.version)
        if min(o.requests, o.errors, o.escalations) < 0:
            raise InvalidRequest(f"counts for {o.version} must not be negative")
        if o.errors > o.requests or o.escalations > o.requests:
            raise InvalidRequest(
                f"errors ({o.errors}) and escalations ({o.escalations}) of {o.version} can't "
                f"exceed its requests ({o.requests})")
        for name, value in (("latency_p50_ms", o.latency_p50_ms),
                            ("latency_p99_ms", o.latency_p99_ms)):
            if not (math.isfinite(value) and value >= 0):
                raise InvalidRequest(f"{name} of {o.version} must be finite and >= 0, "
                                     f"got {value}")
