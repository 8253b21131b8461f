"""The contract between an inference servicer and an engine (cloud or edge), free of grpc.

An engine takes a validated ``GenerationRequest`` and yields ``Chunk``s as tokens are produced;
the last chunk has a ``finish_reason``, ``usage`` and ``timings``. Errors are ``TandemError``s.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from core.request import ChatMessage, GenerationRequest

FINISH_REASONS = ("eos", "stop", "length")


@dataclass(frozen=True)
class ServedBy:
    tier: str  # "edge" | "cloud" | "router"
    node_id: str
    model_version: str


@dataclass(frozen=True)
class EngineInfo:
    served_by: ServedBy
    model_name: str
    max_context: int
    max_new_tokens: int
    precision: str


@dataclass(frozen=True)
class EngineLoad:
    """Live load, reported to routers in trailing metadata and heartbeats."""

    in_flight: int
    queue_depth: int
    slots: int
    queue_capacity: int

    @property
    def saturated(self) -> bool:
        """No free slot and the queue is full: a new request would be refused."""
        return self.in_flight >= self.slots and self.queue_depth >= self.queue_capacity


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Timings:
    queue_ms: float
    time_to_first_token_ms: float
    total_ms: float


@dataclass(frozen=True)
class Chunk:
    """Text and tokens produced since the previous chunk; the last one says how it ended."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    usage: Usage | None = None
    timings: Timings | None = None


def merge_chunks(chunks: list[Chunk]) -> Chunk:
    """Consecutive chunks as one; the last one's ending (finish, usage, timings) is kept."""
    if len(chunks) == 1:
        return chunks[0]
    last = chunks[-1]
    return Chunk(
        "".join(c.text for c in chunks),
        tuple(t for c in chunks for t in c.token_ids),
        last.finish_reason,
        last.usage,
        last.timings,
    )


@dataclass(frozen=True)
class ScoreResult:
    mean_loss: float
    prompt_tokens: int
    # The serving model version's calibrated difficulty threshold, when it has one.
    difficulty_threshold: float | None = None


class Engine(Protocol):
    """What ``EngineServicer`` needs from an engine."""

    @property
    def info(self) -> EngineInfo: ...

    def load(self) -> EngineLoad: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]: ...

    async def score(
        self, prompt: str, messages: tuple[ChatMessage, ...] = ()
    ) -> ScoreResult:
        """Mean loss of ``prompt``, or of ``messages`` rendered with the chat template."""
        ...

    async def start(self) -> None: ...

    async def stop(self, grace_s: float) -> None:
        """Refuse new work, finish what was accepted (up to ``grace_s``), release resources."""
        ...
