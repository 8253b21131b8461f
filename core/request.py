"""The generation request as plain data, and its validation against a server's limits.

Servicers build a ``GenerationRequest`` from the protobuf message and validate it here, so the
same checks (and messages) hold on the cloud tier, edge nodes and the router. Checks that need
the tokenizer (does prompt + max_tokens fit the context?) happen in the engine.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field

from core.errors import InvalidRequest

ROUTES = ("auto", "edge", "cloud")
QUALITIES = ("default", "fast", "best")
ROLES = ("system", "user", "assistant")
# Template text a conversation gains per message (role markers, newlines): what byte and token
# estimates add for each message when the template itself is not at hand.
MESSAGE_OVERHEAD_BYTES = 16


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation; the model's chat template turns them into its prompt."""

    role: str
    content: str


@dataclass(frozen=True)
class Limits:
    """What a server accepts. ``max_new_tokens`` also caps the default ``max_tokens``."""

    max_prompt_bytes: int = 32_768
    max_new_tokens: int = 512
    default_max_tokens: int = 128
    max_stop_sequences: int = 8
    max_stop_bytes: int = 64
    max_top_k: int = 1_000_000
    max_messages: int = 256


@dataclass(frozen=True)
class GenerationRequest:
    """One validated request; sampling fields hold their effective values (defaults applied)."""

    # Exactly one of the two: raw prompt text, or a conversation (then ``prompt`` is "").
    prompt: str
    max_tokens: int
    messages: tuple[ChatMessage, ...] = ()
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    route: str = "auto"
    quality: str = "default"
    no_cache: bool = False
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    # Absolute time.monotonic() by which the client wants the answer (None: no deadline).
    deadline: float | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def prompt_bytes(self) -> int:
        """UTF-8 size of the prompt, or of the conversation's contents plus template overhead."""
        if not self.messages:
            return _utf8_size(self.prompt)
        return sum(_utf8_size(m.content) + MESSAGE_OVERHEAD_BYTES for m in self.messages)

    @property
    def reproducible(self) -> bool:
        """Same request, same answer: greedy, or sampled with a fixed seed."""
        return self.greedy or self.seed is not None


def validate(
    *,
    prompt: str,
    limits: Limits,
    messages: tuple[ChatMessage, ...] = (),
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int = 0,
    seed: int | None = None,
    stop: tuple[str, ...] = (),
    route: str = "auto",
    quality: str = "default",
    no_cache: bool = False,
    request_id: str = "",
    deadline: float | None = None,
) -> GenerationRequest:
    """Check every field against ``limits``; raise ``InvalidRequest`` saying what to change."""
    if messages:
        if prompt:
            raise InvalidRequest("send either prompt or messages, not both")
        validate_messages(messages, limits)
    else:
        validate_prompt(prompt, limits)
    if max_tokens is None:
        max_tokens = min(limits.default_max_tokens, limits.max_new_tokens)
    if not 1 <= max_tokens <= limits.max_new_tokens:
        raise InvalidRequest(f"max_tokens must be 1..{limits.max_new_tokens}, got {max_tokens}")
    temperature = 1.0 if temperature is None else float(temperature)
    if not (math.isfinite(temperature) and 0.0 <= temperature <= 10.0):
        raise InvalidRequest(f"temperature must be in [0, 10] (0 = greedy), got {temperature}")
    top_p = 1.0 if top_p is None else float(top_p)
    if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        raise InvalidRequest(f"top_p must be in (0, 1], got {top_p}")
    if not 0 <= top_k <= limits.max_top_k:
        raise InvalidRequest(f"top_k must be 0 (off) or a positive count, got {top_k}")
    if len(stop) > limits.max_stop_sequences:
        raise InvalidRequest(
            f"at most {limits.max_stop_sequences} stop sequences are allowed, got {len(stop)}"
        )
    for s in stop:
        if not s or len(s.encode("utf-8", errors="surrogatepass")) > limits.max_stop_bytes:
            raise InvalidRequest(
                f"each stop sequence must be 1..{limits.max_stop_bytes} bytes, got {s!r}"
            )
    if route not in ROUTES:
        raise InvalidRequest(f"route must be one of {ROUTES}, got {route!r}")
    if quality not in QUALITIES:
        raise InvalidRequest(f"quality must be one of {QUALITIES}, got {quality!r}")
    if len(request_id) > 128:
        raise InvalidRequest("request_id must be at most 128 characters")
    extra = {"request_id": request_id} if request_id else {}
    return GenerationRequest(
        prompt=prompt,
        messages=tuple(messages),
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=tuple(stop),
        route=route,
        quality=quality,
        no_cache=no_cache,
        deadline=deadline,
        **extra,
    )


def validate_prompt(prompt: str, limits: Limits) -> None:
    """A raw prompt: non-empty text within the byte limit."""
    if not prompt or not prompt.strip():
        raise InvalidRequest("prompt must be non-empty text (or send messages)")
    size = _utf8_size(prompt)
    if size > limits.max_prompt_bytes:
        raise InvalidRequest(
            f"prompt is {size} bytes; the limit is {limits.max_prompt_bytes} bytes"
        )
    if "\x00" in prompt:
        raise InvalidRequest("prompt must not contain NUL characters")


def validate_messages(messages: tuple[ChatMessage, ...], limits: Limits) -> None:
    """A conversation: known roles, some non-empty content, within the message and byte limits."""
    if len(messages) > limits.max_messages:
        raise InvalidRequest(
            f"at most {limits.max_messages} messages are allowed, got {len(messages)}"
        )
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise InvalidRequest(
                f"messages[{i}].role must be one of {ROLES}, got {m.role[:32]!r}"
            )
        if "\x00" in m.content:
            raise InvalidRequest(f"messages[{i}].content must not contain NUL characters")
    if not any(m.content.strip() for m in messages):
        raise InvalidRequest("messages must have some non-empty content")
    size = sum(_utf8_size(m.content) for m in messages)
    if size > limits.max_prompt_bytes:
        raise InvalidRequest(
            f"messages are {size} bytes of content; the limit is {limits.max_prompt_bytes} bytes"
        )


def _utf8_size(text: str) -> int:
    return len(text.encode("utf-8", errors="surrogatepass"))
