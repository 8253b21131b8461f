"""The Python SDK: ``tandem.Client`` (blocking) and ``tandem.AsyncClient`` (asyncio).

Both talk to any Tandem endpoint — a router, the cloud tier or an edge node — since all speak
``tandem.v1.Inference``. Errors come back as the typed exceptions of ``core.errors`` (an
``Overloaded`` carries the server's retry-after hint), so callers never parse status codes.

    with tandem.Client("127.0.0.1:50050") as client:
        print(client.generate("Return a new list", max_tokens=32).text)
        for chunk in client.stream("The json module"):
            print(chunk.text, end="", flush=True)
        print(client.chat([{"role": "user", "content": "What is the capital of France?"}]).text)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc

from core import convert, errors
from core.auth import API_KEY_HEADER
from core.engine_api import ServedBy, Timings, Usage
from core.request import ChatMessage
from protos.tandem.v1 import inference_pb2 as pb
from protos.tandem.v1 import inference_pb2_grpc

_ERRORS: dict[grpc.StatusCode, type[errors.TandemError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidRequest,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.Overloaded,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
    grpc.StatusCode.FAILED_PRECONDITION: errors.WrongState,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
}


@dataclass(frozen=True)
class Completion:
    """A whole answer, with who served it, why, and how long it took."""

    text: str
    finish_reason: str | None
    usage: Usage
    served_by: ServedBy
    route_reason: str
    cached: bool
    timings: Timings
    request_id: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class StreamChunk:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    served_by: ServedBy | None
    route_reason: str
    cached: bool
    usage: Usage | None
    timings: Timings | None


# A chat turn as a ChatMessage, an OpenAI-style {"role": ..., "content": ...} or (role, content).
Message: TypeAlias = ChatMessage | Mapping[str, str] | tuple[str, str]


def _messages(messages: Iterable[Message]) -> list[pb.ChatMessage]:
    out = []
    for m in messages:
        if isinstance(m, ChatMessage):
            role, content = m.role, m.content
        elif isinstance(m, Mapping):
            role, content = m.get("role", ""), m.get("content", "")
        else:
            role, content = m
        out.append(pb.ChatMessage(role=role, content=content))
    return out


def _request(prompt: str, **kw: Any) -> pb.GenerateRequest:
    msg = pb.GenerateRequest(
        prompt=prompt,
        messages=_messages(kw.get("messages") or ()),
        top_k=kw.get("top_k") or 0,
        stop=list(kw.get("stop") or ()),
        route=convert.ROUTE_VALUES[kw.get("route") or "auto"],
        quality=convert.QUALITY_VALUES[kw.get("quality") or "default"],
        no_cache=bool(kw.get("no_cache")),
        request_id=kw.get("request_id") or "",
    )
    for name in ("max_tokens", "temperature", "top_p", "seed"):
        if kw.get(name) is not None:
            setattr(msg, name, kw[name])
    return msg


def _completion(resp: pb.GenerateResponse) -> Completion:
    t, u = resp.timings, resp.usage
    return Completion(
        text=resp.text,
        finish_reason=convert.FINISH_NAMES.get(resp.finish_reason),
        usage=Usage(u.prompt_tokens, u.completion_tokens),
        served_by=convert.served_by_from_proto(resp.served_by),
        route_reason=resp.route_reason,
        cached=resp.cached,
        timings=Timings(t.queue_ms, t.time_to_first_token_ms, t.total_ms),
        request_id=resp.request_id,
        token_ids=tuple(resp.token_ids),
    )


def _chunk(msg: pb.GenerateChunk) -> StreamChunk:
    plain = convert.chunk_from_proto(msg)
    return StreamChunk(
        text=plain.text,
        token_ids=plain.token_ids,
        finish_reason=plain.finish_reason,
        served_by=convert.served_by_from_proto(msg.served_by) if msg.HasField("served_by")
        else None,
        route_reason=msg.route_reason,
        cached=msg.cached,
        usage=plain.usage,
        timings=plain.timings,
    )


def _error(e: grpc.RpcError) -> errors.TandemError:
    """The typed error for a failed call, with the server's retry-after hint when present."""
    code = e.code()
    trailers: dict[str, str | bytes] = dict(e.trailing_metadata() or ())  # type: ignore[arg-type]
    retry_ms = trailers.get("retry-after-ms")
    cls = _ERRORS.get(code, errors.TandemError)
    err = cls(f"{code.name}: {e.details()}",
              retry_after_s=int(retry_ms) / 1000 if retry_ms else None)
    err.status = code.name
    return err


class Client:
    """Blocking client. ``timeout`` (seconds) is each call's deadline unless a call gives one."""

    def __init__(self, address: str, *, api_key: str | None = None, timeout: float = 60.0):
        self._channel = grpc.insecure_channel(address)
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        self._metadata = ((API_KEY_HEADER, api_key),) if api_key else ()
        self.timeout = timeout

    def generate(self, prompt: str, *, timeout: float | None = None, **kw: Any) -> Completion:
        """One whole completion; keyword arguments are GenerateRequest fields."""
        try:
            resp = self._stub.Generate(_request(prompt, **kw), timeout=timeout or self.timeout,
                                       metadata=self._metadata)
        except grpc.RpcError as e:
            raise _error(e) from None
        return _completion(resp)

    def stream(
        self, prompt: str, *, timeout: float | None = None, **kw: Any
    ) -> Iterator[StreamChunk]:
        """Chunks as they are produced; closing the iterator cancels the request."""
        call = self._stub.GenerateStream(_request(prompt, **kw), timeout=timeout or self.timeout,
                                         metadata=self._metadata)
        try:
            for msg in call:
                yield _chunk(msg)
        except grpc.RpcError as e:
            raise _error(e) from None
        finally:
            call.cancel()

    def chat(
        self, messages: Iterable[Message], *, timeout: float | None = None, **kw: Any
    ) -> Completion:
        """The assistant's next turn after ``messages``, rendered with the model's template."""
        return self.generate("", messages=list(messages), timeout=timeout, **kw)

    def chat_stream(
        self, messages: Iterable[Message], *, timeout: float | None = None, **kw: Any
    ) -> Iterator[StreamChunk]:
        """:meth:`chat`, streamed as :meth:`stream` streams."""
        return self.stream("", messages=list(messages), timeout=timeout, **kw)

    def score(self, prompt: str, *, timeout: float | None = None) -> float:
        """The serving model's mean per-token loss on ``prompt`` (nats)."""
        try:
            return self._stub.Score(pb.ScoreRequest(prompt=prompt), metadata=self._metadata,
                                    timeout=timeout or self.timeout).mean_loss
        except grpc.RpcError as e:
            raise _error(e) from None

    def info(self, *, timeout: float | None = None) -> pb.InfoResponse:
        try:
            return self._stub.Info(pb.InfoRequest(), timeout=timeout or self.timeout,
                                   metadata=self._metadata)
        except grpc.RpcError as e:
            raise _error(e) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client with the same methods as ``Client``."""

    def __init__(self, address: str, *, api_key: str | None = None, timeout: float = 60.0):
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        self._metadata = ((API_KEY_HEADER, api_key),) if api_key else ()
        self.timeout = timeout

    async def generate(
        self, prompt: str, *, timeout: float | None = None, **kw: Any
    ) -> Completion:
        try:
            resp = await self._stub.Generate(_request(prompt, **kw), metadata=self._metadata,
                                             timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            raise _error(e) from None
        return _completion(resp)

    async def stream(
        self, prompt: str, *, timeout: float | None = None, **kw: Any
    ) -> AsyncIterator[StreamChunk]:
        call = self._stub.GenerateStream(_request(prompt, **kw), metadata=self._metadata,
                                         timeout=timeout or self.timeout)
        try:
            async for msg in call:
                yield _chunk(msg)
        except grpc.RpcError as e:
            raise _error(e) from None
        finally:
            call.cancel()

    async def chat(
        self, messages: Iterable[Message], *, timeout: float | None = None, **kw: Any
    ) -> Completion:
        return await self.generate("", messages=list(messages), timeout=timeout, **kw)

    def chat_stream(
        self, messages: Iterable[Message], *, timeout: float | None = None, **kw: Any
    ) -> AsyncIterator[StreamChunk]:
        return self.stream("", messages=list(messages), timeout=timeout, **kw)

    async def score(self, prompt: str, *, timeout: float | None = None) -> float:
        try:
            resp = await self._stub.Score(pb.ScoreRequest(prompt=prompt), metadata=self._metadata,
                                          timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            raise _error(e) from None
        return resp.mean_loss

    async def info(self, *, timeout: float | None = None) -> pb.InfoResponse:
        try:
            return await self._stub.Info(pb.InfoRequest(), timeout=timeout or self.timeout,
                                         metadata=self._metadata)
        except grpc.RpcError as e:
            raise _error(e) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
