"""One SQLite database file set up for durable control-plane state, and its transactions.

WAL mode (readers never block the writer; ``tandem model publish`` in another process can write
while the server serves), ``synchronous=FULL`` (a committed enrollment survives a power cut:
the node already holds its credential), foreign keys on, and the schema migrated on open. One
connection shared by this process's threads, serialized by a lock.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from control.schema import migrate

log = logging.getLogger(__name__)

# How long a write waits for another process's write to finish before failing.
BUSY_TIMEOUT_S = 10.0


class Database:
    """An open SQLite file; every use goes through ``transaction()`` or ``snapshot()``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; each one is an explicit BEGIN.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=BUSY_TIMEOUT_S)
        self._lock = threading.Lock()
        try:
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                log.warning("control database %s runs in %s mode, not WAL (network "
                            "filesystem?)", self.path, mode)
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            with self.transaction() as db:
                migrate(db, str(self.path))
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed whole, or rolled back whole on any exception."""
        with self._lock:
            # IMMEDIATE takes the write lock up front, so a read-then-write can't interleave
            # with another process's write (no lost updates, no deadlock on lock upgrade).
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """A consistent read of several SELECTs."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                self._db.execute("COMMIT")
