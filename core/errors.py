"""Typed errors raised inside Tandem; servicers map each to one gRPC status code.

Engines, policies and stores raise these and never import grpc. The message is written for the
user: it says what to change ("max_tokens must be 1..512, got 0").
"""

from __future__ import annotations


class TandemError(Exception):
    """Base class; ``status`` names the gRPC status code the servicer answers with."""

    status = "INTERNAL"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        # A hint for the client: try again after this many seconds (trailing metadata).
        self.retry_after_s = retry_after_s


class InvalidRequest(TandemError):
    """Bad input: the request can never succeed as it is."""

    status = "INVALID_ARGUMENT"


class Overloaded(TandemError):
    """Over a limit or the queue is full: retry later (``retry_after_s`` says when)."""

    status = "RESOURCE_EXHAUSTED"


class Unavailable(TandemError):
    """Draining, loading, or no healthy backend: retry elsewhere or later."""

    status = "UNAVAILABLE"


class DeadlineExceeded(TandemError):
    """The client's deadline passed before the work finished."""

    status = "DEADLINE_EXCEEDED"


class WrongState(TandemError):
    """The operation does not fit the current state (e.g. promoting a finished rollout)."""

    status = "FAILED_PRECONDITION"


class Unauthenticated(TandemError):
    status = "UNAUTHENTICATED"


class PermissionDenied(TandemError):
    status = "PERMISSION_DENIED"


class NotFound(TandemError):
    """The named thing (a model version, a node, a rollout) does not exist."""

    status = "NOT_FOUND"


class OutOfRange(TandemError):
    """A position past the end, e.g. a download resumed beyond the file's size."""

    status = "OUT_OF_RANGE"


class DataLoss(TandemError):
    """Stored data is missing or damaged (a blob deleted under a registered version)."""

    status = "DATA_LOSS"
