"""The control store's SQLite schema, versioned: a fresh database gets ``SCHEMA`` whole, an
older one the migrations after its version, each in the caller's transaction.
"""

from __future__ import annotations

import sqlite3

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);

CREATE TABLE join_tokens (
    token_id    TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL,
    created_at  REAL NOT NULL,
    expires_at  REAL NOT NULL,
    used_at     REAL,
    -- The node that spent it; no foreign key, so the audit trail outlives the node.
    used_by     TEXT,
    note        TEXT NOT NULL DEFAULT ''
);

CREATE TABLE model_versions (
    version         TEXT PRIMARY KEY,
    manifest_path   TEXT NOT NULL,
    manifest        BLOB NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    signature       BLOB NOT NULL,
    key_id          TEXT NOT NULL,
    base_version    TEXT NOT NULL,
    parent_version  TEXT REFERENCES model_versions(version),
    quantization    TEXT NOT NULL,
    total_size      INTEGER NOT NULL,
    created_at      REAL NOT NULL,
    notes           TEXT NOT NULL DEFAULT ''
);

-- One row: the version every node serves unless a rollout overrides it.
CREATE TABLE fleet (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    current_version TEXT REFERENCES model_versions(version)
);
INSERT INTO fleet (id, current_version) VALUES (1, NULL);

CREATE TABLE nodes (
    node_id           TEXT PRIMARY KEY,
    hostname          TEXT NOT NULL,
    inference_address TEXT NOT NULL,
    cpu_cores         INTEGER NOT NULL DEFAULT 0,
    memory_bytes      INTEGER NOT NULL DEFAULT 0,
    cpu_features      TEXT NOT NULL DEFAULT '[]',
    credential_hash   TEXT NOT NULL UNIQUE,
    enrolled_at       REAL NOT NULL,
    last_enrolled_at  REAL NOT NULL,
    last_heartbeat    REAL,
    -- What the node reports; no foreign key: a node may serve an artifact built locally.
    served_version    TEXT,
    loading_version   TEXT,
    healthy           INTEGER NOT NULL DEFAULT 0,
    in_flight         INTEGER NOT NULL DEFAULT 0,
    queue_depth       INTEGER NOT NULL DEFAULT 0,
    tokens_per_second REAL NOT NULL DEFAULT 0,
    -- Set by a rollout for its canaries; NULL follows fleet.current_version.
    target_version    TEXT REFERENCES model_versions(version)
);

CREATE TABLE rollouts (
    rollout_id       INTEGER PRIMARY KEY AUTOINCREMENT,
    version          TEXT NOT NULL REFERENCES model_versions(version),
    previous_version TEXT REFERENCES model_versions(version),
    fraction         REAL NOT NULL CHECK (fraction > 0 AND fraction <= 1),
    state            TEXT NOT NULL
                     CHECK (state IN ('canary', 'promoted', 'rolled_back', 'aborted')),
    started_at       REAL NOT NULL,
    decided_at       REAL,
    reason           TEXT NOT NULL DEFAULT ''
);
-- At most one rollout is undecided at a time: two canaries at once could not be compared.
CREATE UNIQUE INDEX rollouts_one_canary ON rollouts(state) WHERE state = 'canary';

CREATE TABLE rollout_canaries (
    rollout_id INTEGER NOT NULL REFERENCES rollouts(rollout_id) ON DELETE CASCADE,
    node_id    TEXT NOT NULL REFERENCES nodes(node_id) ON DELETE CASCADE,
    PRIMARY KEY (rollout_id, node_id)
);

CREATE TABLE outcomes (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    node_id        TEXT NOT NULL REFERENCES nodes(node_id) ON DELETE CASCADE,
    -- No foreign key: outcomes of a locally built version are kept, not refused.
    version        TEXT NOT NULL,
    reported_at    REAL NOT NULL,
    window_s       REAL NOT NULL,
    requests       INTEGER NOT NULL,
    errors         INTEGER NOT NULL,
    escalations    INTEGER NOT NULL,
    latency_p50_ms REAL NOT NULL,
    latency_p99_ms REAL NOT NULL
);
-- The rollout controller reads one version's windows since a time.
CREATE INDEX outcomes_by_version ON outcomes(version, reported_at);
"""

# MIGRATIONS[n] takes a database from version n to n + 1.
MIGRATIONS: dict[int, str] = {}


def schema_version(db: sqlite3.Connection) -> int:
    """The database's schema version; 0 for an empty database."""
    exists = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    ).fetchone()
    if exists is None:
        return 0
    row = db.execute("SELECT version FROM schema_version").fetchone()
    return int(row[0]) if row else 0


def migrate(db: sqlite3.Connection, path: str) -> int:
    """Bring the database to ``SCHEMA_VERSION`` inside the caller's transaction."""
    found = schema_version(db)
    if found > SCHEMA_VERSION:
        raise RuntimeError(
            f"control database {path} has schema version {found}, newer than this tandem "
            f"understands ({SCHEMA_VERSION}); upgrade tandem"
        )
    if found == 0:
        # executescript would COMMIT the open transaction; run the statements one by one.
        for statement in _statements(SCHEMA):
            db.execute(statement)
        db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        return SCHEMA_VERSION
    for version in range(found, SCHEMA_VERSION):
        for statement in _statements(MIGRATIONS[version]):
            db.execute(statement)
    db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
    return SCHEMA_VERSION


def _statements(script: str) -> list[str]:
    """Split a script into statements (complete_statement knows about strings and comments)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip() and not all(
        part.strip().startswith("--") or not part.strip() for part in current.splitlines()
    ):
        raise ValueError(f"incomplete SQL statement: {current.strip()[:80]}")
    return statements
