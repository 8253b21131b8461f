"""What an edge engine serves and how much work it takes on at once (one frozen config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from core.request import Limits


@dataclass(frozen=True)
class EdgeEngineConfig:
    """What an edge engine serves and how much work it takes on at once."""

    artifact_dir: Path
    node_id: str = "edge-0"
    # Sequences decoding in parallel; each holds a genai Generator (its own KV cache).
    max_concurrency: int = 4
    # Requests that may wait for a slot; one more is refused with RESOURCE_EXHAUSTED.
    max_queue: int = 16
    # ONNX Runtime intra-op threads per session; None: ORT's default (one per core).
    threads: int | None = None
    limits: Limits = field(default_factory=Limits)
    # After a swap, requests still running on the old model get this long before they are
    # ended (a client that stops reading must not pin an old model in memory forever).
    swap_drain_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads}")
