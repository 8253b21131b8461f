"""Tandem: one LLM served across a cloud GPU tier and quantized CPU edge nodes.

``tandem.Client`` and ``tandem.AsyncClient`` are the Python SDK (imported on first use, so the
command line starts without grpc when it does not need it).
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["AsyncClient", "Client", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Client", "AsyncClient"):
        from tandem import client

        return getattr(client, name)
    raise AttributeError(f"module 'tandem' has no attribute {name!r}")
