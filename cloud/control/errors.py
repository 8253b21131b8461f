"""Typed errors of the control plane whose status ``tandem.errors`` has no class for yet.

``tandem.serving.grpc_server.abort`` maps any ``TandemError`` by its ``status`` name, so these
reach the edge agent as NOT_FOUND, OUT_OF_RANGE and DATA_LOSS.
"""

from __future__ import annotations

from tandem.errors import TandemError


class NotFound(TandemError):
    """The named thing (a model version, a node, a rollout) does not exist."""

    status = "NOT_FOUND"


class OutOfRange(TandemError):
    """A position past the end, e.g. a download resumed beyond the file's size."""

    status = "OUT_OF_RANGE"


class DataLoss(TandemError):
    """Stored data is missing or damaged (a blob deleted under a registered version)."""

    status = "DATA_LOSS"
