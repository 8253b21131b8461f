"""Model versions, the fleet's current version, and canary rollouts, in the control database.

What a node should serve is its ``target_version`` when a rollout set one, else the fleet's
current version. Starting and deciding a rollout change its row and its nodes' targets in one
transaction, so Heartbeat never answers from half a decision.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
from collections.abc import Callable, Iterable, Sequence

from control.database import Database
from control.records import FINAL_STATES, ModelVersion, Rollout
from control.validate import check_version_name
from core.errors import InvalidRequest, NotFound, WrongState

log = logging.getLogger(__name__)

_VERSION_COLUMNS = """version, manifest_path, manifest, manifest_sha256, signature, key_id,
    base_version, parent_version, quantization, total_size, created_at, notes"""


class ModelRegistry:
    """Versions and rollouts over an open ``Database``; ``ControlStore`` adds nodes to it."""

    def __init__(self, db: Database, clock: Callable[[], float]) -> None:
        self._db = db
        self.clock = clock

    # -- model versions -------------------------------------------------------------------------

    def add_version(
        self,
        version: ModelVersion,
        *,
        make_current: bool | None = None,
    ) -> tuple[ModelVersion, bool]:
        """Register a version (``created_at`` is set here); ``(record, created)``.

        The same manifest again registers nothing; a different one under a taken name is
        refused. ``make_current``: True makes it the fleet's version, None only when the fleet
        has none yet (the first publish), False never.
        """
        check_version_name(version.version)
        now = self.clock()
        with self._db.transaction() as db:
            old = db.execute(f"SELECT {_VERSION_COLUMNS} FROM model_versions WHERE version = ?",
                             (version.version,)).fetchone()
            if old is not None:
                existing = ModelVersion(*old)
                if existing.manifest_sha256 != version.manifest_sha256:
                    raise WrongState(
                        f"model version {version.version} is already published with other "
                        "files; publish this artifact under a new version name")
                if make_current:
                    db.execute("UPDATE fleet SET current_version = ?", (version.version,))
                return existing, False
            if version.parent_version is not None:
                self._require_version(db, version.parent_version)
            db.execute(
                f"INSERT INTO model_versions ({_VERSION_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (version.version, version.manifest_path, version.manifest_json,
                 version.manifest_sha256, version.signature, version.key_id,
                 version.base_version, version.parent_version, version.quantization,
                 version.total_size, now, version.notes))
            current = db.execute("SELECT current_version FROM fleet").fetchone()[0]
            if make_current or (make_current is None and current is None):
                db.execute("UPDATE fleet SET current_version = ?", (version.version,))
        log.info("registered model version %s (%d bytes)", version.version, version.total_size)
        return dataclasses.replace(version, created_at=now), True

    def version(self, version: str) -> ModelVersion:
        """A published version; raises NotFound."""
        with self._db.snapshot() as db:
            row = db.execute(f"SELECT {_VERSION_COLUMNS} FROM model_versions WHERE version = ?",
                             (version,)).fetchone()
        if row is None:
            raise NotFound(f"model version {version!r} is not published")
        return ModelVersion(*row)

    def versions(self) -> list[ModelVersion]:
        """Every published version, oldest first."""
        with self._db.snapshot() as db:
            rows = db.execute(f"SELECT {_VERSION_COLUMNS} FROM model_versions "
                              "ORDER BY created_at, version").fetchall()
        return [ModelVersion(*row) for row in rows]

    def current_version(self) -> str | None:
        """The fleet's current version: what every node serves unless a rollout says else."""
        with self._db.snapshot() as db:
            return db.execute("SELECT current_version FROM fleet").fetchone()[0]

    def set_current_version(self, version: str) -> None:
        with self._db.transaction() as db:
            self._require_version(db, version)
            db.execute("UPDATE fleet SET current_version = ?", (version,))
        log.info("fleet version is now %s", version)

    def set_target_version(self, node_ids: Iterable[str], version: str | None) -> None:
        """Pin nodes to ``version`` (None: back to following the fleet)."""
        ids = list(node_ids)
        with self._db.transaction() as db:
            if version is not None:
                self._require_version(db, version)
            for node_id in ids:
                if not db.execute("UPDATE nodes SET target_version = ? WHERE node_id = ?",
                                  (version, node_id)).rowcount:
                    raise NotFound(f"node {node_id} is not enrolled")

    @staticmethod
    def _require_version(db: sqlite3.Connection, version: str) -> None:
        if db.execute("SELECT 1 FROM model_versions WHERE version = ?",
                      (version,)).fetchone() is None:
            raise NotFound(f"model version {version!r} is not published")

    # -- rollouts -------------------------------------------------------------------------------

    def start_rollout(self, version: str, canary_node_ids: Sequence[str],
                      fraction: float) -> Rollout:
        """Start a canary rollout: the canaries' target becomes ``version``, atomically."""
        if not (0 < fraction <= 1):
            raise InvalidRequest(f"canary fraction must be in (0, 1], got {fraction}")
        canaries = sorted(set(canary_node_ids))
        if not canaries:
            raise WrongState(f"a rollout of {version} needs at least one canary node; "
                             "enroll a node first")
        now = self.clock()
        with self._db.transaction() as db:
            self._require_version(db, version)
            active = db.execute(
                "SELECT rollout_id, version FROM rollouts WHERE state = 'canary'").fetchone()
            if active is not None:
                raise WrongState(f"rollout {active[0]} of {active[1]} is still in canary; "
                                 "promote or abort it first")
            previous = db.execute("SELECT current_version FROM fleet").fetchone()[0]
            if previous == version:
                raise WrongState(f"{version} is already the fleet's current version")
            rollout_id = db.execute(
                "INSERT INTO rollouts (version, previous_version, fraction, state, started_at) "
                "VALUES (?, ?, ?, 'canary', ?)", (version, previous, fraction, now)).lastrowid
            for node_id in canaries:
                if not db.execute("UPDATE nodes SET target_version = ? WHERE node_id = ?",
                                  (version, node_id)).rowcount:
                    raise NotFound(f"canary node {node_id} is not enrolled")
                db.execute("INSERT INTO rollout_canaries (rollout_id, node_id) VALUES (?, ?)",
                           (rollout_id, node_id))
            assert rollout_id is not None
            record = self._rollout(db, rollout_id)
        log.info("rollout %d: %s to canaries %s", rollout_id, version, ", ".join(canaries))
        return record

    def decide_rollout(self, rollout_id: int, state: str, reason: str = "") -> Rollout:
        """End a canary rollout as promoted (the fleet moves to its version), rolled_back or
        aborted (the canaries return to the fleet's version), atomically."""
        if state not in FINAL_STATES:
            raise InvalidRequest(f"a rollout ends {', '.join(FINAL_STATES)}; got {state!r}")
        with self._db.transaction() as db:
            rollout = self._rollout(db, rollout_id)
            if rollout.state != "canary":
                raise WrongState(f"rollout {rollout_id} was already {rollout.state}")
            db.execute("UPDATE rollouts SET state = ?, decided_at = ?, reason = ? "
                       "WHERE rollout_id = ?", (state, self.clock(), reason, rollout_id))
            if state == "promoted":
                db.execute("UPDATE fleet SET current_version = ?", (rollout.version,))
                db.execute("UPDATE nodes SET target_version = NULL WHERE target_version = ?",
                           (rollout.version,))
            else:
                db.execute(
                    "UPDATE nodes SET target_version = NULL WHERE target_version = ? AND node_id "
                    "IN (SELECT node_id FROM rollout_canaries WHERE rollout_id = ?)",
                    (rollout.version, rollout_id))
            record = self._rollout(db, rollout_id)
        log.info("rollout %d of %s %s%s", rollout_id, rollout.version, state,
                 f": {reason}" if reason else "")
        return record

    def rollout(self, rollout_id: int) -> Rollout:
        with self._db.snapshot() as db:
            return self._rollout(db, rollout_id)

    def active_rollout(self) -> Rollout | None:
        """The rollout in canary, if any."""
        with self._db.snapshot() as db:
            row = db.execute("SELECT rollout_id FROM rollouts WHERE state = 'canary'").fetchone()
            return None if row is None else self._rollout(db, row[0])

    def rollouts(self) -> list[Rollout]:
        """Every rollout, oldest first."""
        with self._db.snapshot() as db:
            ids = [r[0] for r in db.execute("SELECT rollout_id FROM rollouts ORDER BY rollout_id")]
            return [self._rollout(db, i) for i in ids]

    @staticmethod
    def _rollout(db: sqlite3.Connection, rollout_id: int) -> Rollout:
        row = db.execute(
            "SELECT rollout_id, version, previous_version, fraction, state, started_at, "
            "decided_at, reason FROM rollouts WHERE rollout_id = ?", (rollout_id,)).fetchone()
        if row is None:
            raise NotFound(f"no rollout {rollout_id}")
        canaries = tuple(r[0] for r in db.execute(
            "SELECT node_id FROM rollout_canaries WHERE rollout_id = ? ORDER BY node_id",
            (rollout_id,)))
        rid, version, previous, fraction, state, started, decided, reason = row
        return Rollout(rid, version, previous, canaries, fraction, state, started, decided,
                       reason)

