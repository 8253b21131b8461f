"""A control plane's data directory: its database, artifact store and signing key together.

``DIR/control.db`` (SQLite), ``DIR/artifacts/`` (content-addressed files) and
``DIR/manifest-signing-key.pem`` (Ed25519, mode 0600). The server, ``tandem model publish`` and
``tandem cloud token create`` all open the same directory; several processes may at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from control.artifacts import ArtifactStore
from control.store import ControlStore
from model.signing import SigningKey

DB_NAME = "control.db"
ARTIFACTS_DIR = "artifacts"
KEY_NAME = "manifest-signing-key.pem"
DEFAULT_DATA_DIR = Path("~/.tandem/control")
DATA_DIR_ENV = "TANDEM_CONTROL_DIR"


def default_data_dir() -> Path:
    """``$TANDEM_CONTROL_DIR``, else ``~/.tandem/control``."""
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser()


@dataclass
class ControlData:
    """The open parts of a data directory; ``close()`` closes the database."""

    root: Path
    store: ControlStore
    artifacts: ArtifactStore
    key: SigningKey

    @classmethod
    def open(cls, root: str | Path, *, clock: Callable[[], float] | None = None) -> ControlData:
        """Open (creating on first use) the data directory at ``root``."""
        root = Path(root).expanduser()
        # Private when we create it: the database holds only hashes, but node addresses and
        # the fleet's layout are still nobody else's business.
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = SigningKey.load_or_create(root / KEY_NAME)
        artifacts = ArtifactStore(root / ARTIFACTS_DIR)
        store = ControlStore(root / DB_NAME, **({"clock": clock} if clock else {}))
        return cls(root, store, artifacts, key)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> ControlData:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
