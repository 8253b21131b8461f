"""Tandem: one LLM served across a cloud GPU tier and quantized CPU edge nodes.

``tandem.Client`` and ``tandem.AsyncClient`` are the Python SDK (imported on first use, so the
command line starts without grpc when it does not need it); failed calls raise the typed errors
``tandem.InvalidRequest``, ``tandem.Overloaded`` (with ``retry_after_s``), ``tandem.Unavailable``
and the rest of ``core.errors``.
"""

from typing import Any

__version__ = "0.1.0"
_ERRORS = ("TandemError", "InvalidRequest", "Overloaded", "Unavailable", "DeadlineExceeded",
           "WrongState", "Unauthenticated", "PermissionDenied", "NotFound")
__all__ = ["AsyncClient", "Client", "__version__", *_ERRORS]


def __getattr__(name: str) -> Any:
    if name in ("Client", "AsyncClient"):
        from tandem import client

        return getattr(client, name)
    if name in _ERRORS:
        from core import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'tandem' has no attribute {name!r}")
