"""Durable control-plane state in SQLite: join tokens, nodes, outcomes, and (inherited from
``ModelRegistry``) model versions and rollouts, behind one object.

Every mutation is one transaction (``Database.transaction``), so e.g. a join token is spent if
and only if its node was written. The methods block on disk: the servicer calls them through
``asyncio.to_thread``. They raise ``core.errors`` types, never
grpc statuses.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from control import credentials
from control.database import Database
from control.records import (
    Enrollment,
    JoinToken,
    NodeLoad,
    NodeRecord,
    NodeResources,
    OutcomeWindow,
    VersionOutcome,
)
from control.registry import ModelRegistry
from control.validate import check_enrollment, check_heartbeat, check_outcomes
from core.errors import NotFound, Unauthenticated

log = logging.getLogger(__name__)

_HOW_TOKEN = "make a new one with `tandem cloud token create`"
_NODE_COLUMNS = """n.node_id, n.hostname, n.inference_address, n.cpu_cores, n.memory_bytes,
    n.cpu_features, n.enrolled_at, n.last_enrolled_at, n.last_heartbeat, n.served_version,
    n.loading_version, n.healthy, n.in_flight, n.queue_depth, n.tokens_per_second,
    n.target_version, COALESCE(n.target_version, f.current_version, '')"""


class ControlStore(ModelRegistry):
    """The control plane's SQLite database at ``path`` (created on first use)."""

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        # Wall-clock time: timestamps are stored and compared across restarts.
        super().__init__(Database(self.path), clock)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ControlStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- join tokens ----------------------------------------------------------------------------

    def create_join_token(self, ttl_s: float, *, note: str = "") -> str:
        """A single-use join token valid for ``ttl_s`` seconds; returned once, stored hashed."""
        if not (math.isfinite(ttl_s) and ttl_s > 0):
            raise ValueError(f"token ttl must be a positive number of seconds, got {ttl_s}")
        token_id, token, secret_hash = credentials.new_join_token()
        now = self.clock()
        with self._db.transaction() as db:
            db.execute(
                "INSERT INTO join_tokens (token_id, secret_hash, created_at, expires_at, note) "
                "VALUES (?, ?, ?, ?, ?)", (token_id, secret_hash, now, now + ttl_s, note))
        log.info("created join token %s (expires in %.0f s)", token_id, ttl_s)
        return token

    def join_tokens(self) -> list[JoinToken]:
        """Every token ever made, oldest first (ids and state, never secrets)."""
        with self._db.snapshot() as db:
            rows = db.execute(
                "SELECT token_id, created_at, expires_at, used_at, used_by, note "
                "FROM join_tokens ORDER BY created_at").fetchall()
        return [JoinToken(*row) for row in rows]

    # -- nodes ----------------------------------------------------------------------------------

    def enroll(
        self,
        join_token: str,
        *,
        hostname: str,
        inference_address: str,
        resources: NodeResources | None = None,
        node_id: str = "",
    ) -> Enrollment:
        """Spend ``join_token`` and enroll a node, or re-enroll ``node_id`` with a new credential.

        Raises Unauthenticated for an unknown, used or expired token, InvalidRequest for bad
        fields (which leave the token unspent).
        """
        resources = resources or NodeResources()
        check_enrollment(hostname, inference_address, resources, node_id)
        parsed = credentials.parse_join_token(join_token or "")
        if parsed is None:
            raise Unauthenticated(f"malformed join token (expected tdmj_<id>_<secret>); "
                                  f"{_HOW_TOKEN}")
        token_id, secret_hash = parsed
        credential, credential_hash = credentials.new_credential()
        now = self.clock()
        with self._db.transaction() as db:
            self._spend_token(db, token_id, secret_hash, now)
            existing = bool(node_id) and db.execute(
                "SELECT 1 FROM nodes WHERE node_id = ?", (node_id,)).fetchone() is not None
            node_id = node_id or self._fresh_node_id(db)
            fields = (hostname, inference_address, resources.cpu_cores, resources.memory_bytes,
                      json.dumps(list(resources.cpu_features)), credential_hash, now)
            if existing:
                # Same id, same rollout targets and history; the old credential stops working.
                db.execute(
                    "UPDATE nodes SET hostname = ?, inference_address = ?, cpu_cores = ?, "
                    "memory_bytes = ?, cpu_features = ?, credential_hash = ?, "
                    "last_enrolled_at = ? WHERE node_id = ?", (*fields, node_id))
            else:
                db.execute(
                    "INSERT INTO nodes (hostname, inference_address, cpu_cores, memory_bytes, "
                    "cpu_features, credential_hash, last_enrolled_at, enrolled_at, node_id) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", (*fields, now, node_id))
            db.execute("UPDATE join_tokens SET used_at = ?, used_by = ? WHERE token_id = ?",
                       (now, node_id, token_id))
            desired = self._desired(db, node_id)
        log.info("%s node %s (%s, serves at %s) with join token %s",
                 "re-enrolled" if existing else "enrolled", node_id, hostname,
                 inference_address, token_id)
        return Enrollment(node_id, credential, desired, reenrolled=existing)

    def _spend_token(self, db: sqlite3.Connection, token_id: str, secret_hash: str,
                     now: float) -> None:
        row = db.execute(
            "SELECT secret_hash, expires_at, used_at, used_by FROM join_tokens "
            "WHERE token_id = ?", (token_id,)).fetchone()
        if row is None or not credentials.same_digest(row[0], secret_hash):
            raise Unauthenticated(f"join token is not recognized: check it was copied whole, "
                                  f"or {_HOW_TOKEN}")
        _, expires_at, used_at, used_by = row
        if used_at is not None:
            raise Unauthenticated(
                f"join token {token_id} was already used (by node {used_by} at "
                f"{_when(used_at)}); join tokens are single-use: {_HOW_TOKEN}")
        if now >= expires_at:
            raise Unauthenticated(f"join token {token_id} expired at {_when(expires_at)}; "
                                  f"{_HOW_TOKEN}")

    @staticmethod
    def _fresh_node_id(db: sqlite3.Connection) -> str:
        while True:
            node_id = credentials.new_node_id()
            if db.execute("SELECT 1 FROM nodes WHERE node_id = ?", (node_id,)).fetchone() is None:
                return node_id

    def authenticate(self, credential: str) -> str:
        """The node id a credential belongs to; raises Unauthenticated otherwise."""
        if not credentials.is_credential(credential or ""):
            raise Unauthenticated("missing or malformed node credential: send the one Enroll "
                                  "returned as metadata 'authorization: Bearer <credential>'")
        with self._db.snapshot() as db:
            row = db.execute("SELECT node_id FROM nodes WHERE credential_hash = ?",
                             (credentials.digest(credential),)).fetchone()
        if row is None:
            # An index lookup by hash: timing reveals nothing about any stored secret.
            raise Unauthenticated("node credential is not recognized (replaced by a later "
                                  "enrollment?); re-enroll the node with a new join token")
        return str(row[0])

    def heartbeat(
        self,
        node_id: str,
        *,
        served_version: str,
        loading_version: str = "",
        load: NodeLoad | None = None,
        healthy: bool = True,
    ) -> str:
        """Record a node's state; returns the version it should serve ("" when none)."""
        load = load or NodeLoad()
        check_heartbeat(served_version, loading_version, load)
        with self._db.transaction() as db:
            updated = db.execute(
                "UPDATE nodes SET last_heartbeat = ?, served_version = ?, loading_version = ?, "
                "healthy = ?, in_flight = ?, queue_depth = ?, tokens_per_second = ? "
                "WHERE node_id = ?",
                (self.clock(), served_version or None, loading_version or None, int(healthy),
                 load.in_flight, load.queue_depth, load.tokens_per_second, node_id)).rowcount
            if not updated:
                raise NotFound(f"node {node_id} is not enrolled")
            return self._desired(db, node_id)

    @staticmethod
    def _desired(db: sqlite3.Connection, node_id: str) -> str:
        row = db.execute(
            "SELECT COALESCE(n.target_version, f.current_version, '') FROM nodes n, fleet f "
            "WHERE n.node_id = ?", (node_id,)).fetchone()
        return str(row[0]) if row else ""

    def node(self, node_id: str) -> NodeRecord:
        with self._db.snapshot() as db:
            row = db.execute(f"SELECT {_NODE_COLUMNS} FROM nodes n, fleet f "
                             "WHERE n.node_id = ?", (node_id,)).fetchone()
        if row is None:
            raise NotFound(f"node {node_id} is not enrolled")
        return _node(row)

    def nodes(self) -> list[NodeRecord]:
        """Every enrolled node, in enrollment order."""
        with self._db.snapshot() as db:
            rows = db.execute(f"SELECT {_NODE_COLUMNS} FROM nodes n, fleet f "
                              "ORDER BY n.enrolled_at, n.node_id").fetchall()
        return [_node(row) for row in rows]

    # -- outcomes -------------------------------------------------------------------------------

    def record_outcomes(self, node_id: str, window_s: float,
                        outcomes: Sequence[VersionOutcome]) -> int:
        """Store one report (a window per version) in one transaction; returns rows written."""
        check_outcomes(window_s, outcomes)
        now = self.clock()
        with self._db.transaction() as db:
            if db.execute("SELECT 1 FROM nodes WHERE node_id = ?", (node_id,)).fetchone() is None:
                raise NotFound(f"node {node_id} is not enrolled")
            db.executemany(
                "INSERT INTO outcomes (node_id, version, reported_at, window_s, requests, errors, "
                "escalations, latency_p50_ms, latency_p99_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(node_id, o.version, now, window_s, o.requests, o.errors, o.escalations,
                  o.latency_p50_ms, o.latency_p99_ms) for o in outcomes])
        return len(outcomes)

    def outcomes(
        self,
        *,
        version: str | None = None,
        node_ids: Sequence[str] | None = None,
        since: float | None = None,
    ) -> list[OutcomeWindow]:
        """Reported windows, oldest first, filtered by version, nodes and report time."""
        where: list[str] = ["1 = 1"]
        params: list[Any] = []
        if version is not None:
            where.append("version = ?")
            params.append(version)
        if node_ids is not None:
            where.append(f"node_id IN ({', '.join('?' * len(node_ids))})" if node_ids else "0")
            params.extend(node_ids)
        if since is not None:
            where.append("reported_at >= ?")
            params.append(since)
        with self._db.snapshot() as db:
            rows = db.execute(
                "SELECT node_id, version, reported_at, window_s, requests, errors, escalations, "
                f"latency_p50_ms, latency_p99_ms FROM outcomes WHERE {' AND '.join(where)} "
                "ORDER BY reported_at, id", params).fetchall()
        return [OutcomeWindow(*row) for row in rows]


def _node(row: tuple[Any, ...]) -> NodeRecord:
    (node_id, hostname, address, cores, memory, features, enrolled, reenrolled, heartbeat,
     served, loading, healthy, in_flight, queue, tps, target, desired) = row
    return NodeRecord(
        node_id=node_id, hostname=hostname, inference_address=address,
        resources=NodeResources(cores, memory, tuple(json.loads(features))),
        enrolled_at=enrolled, last_enrolled_at=reenrolled, last_heartbeat=heartbeat,
        served_version=served, loading_version=loading, healthy=bool(healthy),
        load=NodeLoad(in_flight, queue, tps), target_version=target, desired_version=desired)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))
