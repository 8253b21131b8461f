"""Protobuf messages <-> Tandem's plain dataclasses. The only place that knows both."""

from __future__ import annotations

from collections.abc import Sequence

from core.engine_api import Chunk, EngineInfo, ServedBy, Timings, Usage
from core.errors import InvalidRequest
from core.request import (
    ChatMessage,
    GenerationRequest,
    Limits,
    validate,
    validate_messages,
    validate_prompt,
)
from protos.tandem.v1 import inference_pb2 as pb

ROUTE_NAMES = {pb.ROUTE_AUTO: "auto", pb.ROUTE_EDGE: "edge", pb.ROUTE_CLOUD: "cloud"}
ROUTE_VALUES = {v: k for k, v in ROUTE_NAMES.items()}
QUALITY_NAMES = {pb.QUALITY_DEFAULT: "default", pb.QUALITY_FAST: "fast", pb.QUALITY_BEST: "best"}
QUALITY_VALUES = {v: k for k, v in QUALITY_NAMES.items()}
TIER_VALUES = {"edge": pb.TIER_EDGE, "cloud": pb.TIER_CLOUD, "router": pb.TIER_ROUTER}
TIER_NAMES = {v: k for k, v in TIER_VALUES.items()}
FINISH_VALUES = {"eos": pb.FINISH_REASON_EOS, "stop": pb.FINISH_REASON_STOP,
                 "length": pb.FINISH_REASON_LENGTH}
FINISH_NAMES = {v: k for k, v in FINISH_VALUES.items()}


def request_from_proto(
    msg: pb.GenerateRequest, limits: Limits, deadline: float | None = None
) -> GenerationRequest:
    """Validate a GenerateRequest; raises InvalidRequest with a message for the user."""
    return validate(
        prompt=msg.prompt,
        messages=messages_from_proto(msg.messages),
        limits=limits,
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else None,
        temperature=msg.temperature if msg.HasField("temperature") else None,
        top_p=msg.top_p if msg.HasField("top_p") else None,
        top_k=msg.top_k,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=tuple(msg.stop),
        route=ROUTE_NAMES.get(msg.route, f"unknown ({msg.route})"),
        quality=QUALITY_NAMES.get(msg.quality, f"unknown ({msg.quality})"),
        no_cache=msg.no_cache,
        request_id=msg.request_id,
        deadline=deadline,
    )


def request_to_proto(req: GenerationRequest) -> pb.GenerateRequest:
    """The message a router forwards (effective values made explicit)."""
    msg = pb.GenerateRequest(
        prompt=req.prompt, max_tokens=req.max_tokens, temperature=req.temperature,
        top_p=req.top_p, top_k=req.top_k, stop=list(req.stop), route=ROUTE_VALUES[req.route],
        quality=QUALITY_VALUES[req.quality], no_cache=req.no_cache, request_id=req.request_id,
        messages=messages_to_proto(req.messages),
    )
    if req.seed is not None:
        msg.seed = req.seed
    return msg


def score_input_from_proto(
    msg: pb.ScoreRequest, limits: Limits
) -> tuple[str, tuple[ChatMessage, ...]]:
    """A ScoreRequest's prompt or conversation, validated as GenerateRequest's are."""
    messages = messages_from_proto(msg.messages)
    if messages:
        if msg.prompt:
            raise InvalidRequest("send either prompt or messages, not both")
        validate_messages(messages, limits)
    else:
        validate_prompt(msg.prompt, limits)
    return msg.prompt, messages


def messages_from_proto(msgs: Sequence[pb.ChatMessage]) -> tuple[ChatMessage, ...]:
    return tuple(ChatMessage(m.role, m.content) for m in msgs)


def messages_to_proto(messages: Sequence[ChatMessage]) -> list[pb.ChatMessage]:
    return [pb.ChatMessage(role=m.role, content=m.content) for m in messages]


def served_by_to_proto(s: ServedBy) -> pb.ServedBy:
    return pb.ServedBy(tier=TIER_VALUES[s.tier], node_id=s.node_id, model_version=s.model_version)


def served_by_from_proto(m: pb.ServedBy) -> ServedBy:
    return ServedBy(TIER_NAMES.get(m.tier, "unknown"), m.node_id, m.model_version)


def _usage(u: Usage) -> pb.Usage:
    return pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                    total_tokens=u.total_tokens)


def _timings(t: Timings) -> pb.Timings:
    return pb.Timings(queue_ms=t.queue_ms, time_to_first_token_ms=t.time_to_first_token_ms,
                      total_ms=t.total_ms)


def chunk_to_proto(
    chunk: Chunk, *, served_by: ServedBy, request_id: str, first: bool, route_reason: str = "",
    cached: bool = False,
) -> pb.GenerateChunk:
    """A stream chunk; who served it is repeated on the first and the last chunk."""
    msg = pb.GenerateChunk(text=chunk.text, token_ids=list(chunk.token_ids), cached=cached,
                           request_id=request_id)
    last = chunk.finish_reason is not None
    if first or last:
        msg.served_by.CopyFrom(served_by_to_proto(served_by))
        msg.route_reason = route_reason
    if chunk.finish_reason is not None:
        msg.finish_reason = FINISH_VALUES[chunk.finish_reason]
        if chunk.usage:
            msg.usage.CopyFrom(_usage(chunk.usage))
        if chunk.timings:
            msg.timings.CopyFrom(_timings(chunk.timings))
    return msg


def chunk_from_proto(msg: pb.GenerateChunk) -> Chunk:
    usage = timings = None
    if msg.HasField("usage"):
        usage = Usage(msg.usage.prompt_tokens, msg.usage.completion_tokens)
    if msg.HasField("timings"):
        t = msg.timings
        timings = Timings(t.queue_ms, t.time_to_first_token_ms, t.total_ms)
    return Chunk(msg.text, tuple(msg.token_ids), FINISH_NAMES.get(msg.finish_reason), usage,
                 timings)


def response_from_chunks(
    chunks: Sequence[Chunk], *, served_by: ServedBy, request_id: str, route_reason: str = "",
    cached: bool = False,
) -> pb.GenerateResponse:
    """Fold a finished stream into one unary response."""
    last = chunks[-1]
    resp = pb.GenerateResponse(
        text="".join(c.text for c in chunks),
        token_ids=[t for c in chunks for t in c.token_ids],
        served_by=served_by_to_proto(served_by),
        route_reason=route_reason,
        cached=cached,
        request_id=request_id,
    )
    if last.finish_reason:
        resp.finish_reason = FINISH_VALUES[last.finish_reason]
    if last.usage:
        resp.usage.CopyFrom(_usage(last.usage))
    if last.timings:
        resp.timings.CopyFrom(_timings(last.timings))
    return resp


def info_to_proto(info: EngineInfo) -> pb.InfoResponse:
    return pb.InfoResponse(
        served_by=served_by_to_proto(info.served_by), max_context_tokens=info.max_context,
        max_new_tokens=info.max_new_tokens, precision=info.precision, model_name=info.model_name,
    )
