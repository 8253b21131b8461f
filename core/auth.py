"""Credentials on the wire: the metadata names every Tandem server and client agree on, and the
one shape of an auth gate (read a metadata header, verify it, abort with a status).

``AuthInterceptor`` is that shape as a grpc.aio server interceptor: it wraps each method handler
so the check runs inside the RPC's own task, with the request in hand, and leaves the verdict to
a subclass (``control.server.NodeGate``, ``router.auth.ApiKeyInterceptor``). Methods matching
``public`` pass unwrapped; any other method, known today or added later, goes through ``admit``.
No Tandem component is imported here: only grpc and the standard library.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc

# An API key from a client to a router (or a tier behind one): the SDK's ``api_key=``.
API_KEY_HEADER = "x-api-key"


def metadata_value(metadata: Any, key: str) -> str | None:
    """The first value of ``key`` in ``metadata`` as text (binary values decoded leniently)."""
    for k, value in metadata or ():
        if k == key:
            return value.decode(errors="replace") if isinstance(value, bytes) else value
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Runs ``admit`` before every non-public RPC and ``finished`` after it; subclasses decide."""

    # False: a client-streaming method is refused (NotImplementedError), never let in unchecked.
    client_streaming = True

    def __init__(self, header: str, public: Sequence[str] = ()) -> None:
        self.header = header
        self.public = tuple(public)

    def credential(self, metadata: Any) -> str | None:
        """What ``admit`` verifies: the header's value; override to unwrap a scheme."""
        return metadata_value(metadata, self.header)

    async def admit(self, method: str, credential: str | None, request: Any,
                    context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Verify ``credential`` for ``method`` (``request`` is None for client streams);
        abort the RPC on refusal."""
        raise NotImplementedError

    def finished(self, method: str, failure: BaseException | None,
                 context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Called once each wrapped RPC ends, refused ones included (a hook for metrics)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails],
                               Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if handler is None or details.method.startswith(self.public):
            return handler  # unknown methods stay UNIMPLEMENTED
        if not self.client_streaming and not (handler.unary_unary or handler.unary_stream):
            raise NotImplementedError(
                f"{type(self).__name__} cannot guard client-streaming {details.method}")
        return self._wrap(handler, details.method, self.credential(details.invocation_metadata))

    def _wrap(self, handler: grpc.RpcMethodHandler[Any, Any], method: str,
              credential: str | None) -> grpc.RpcMethodHandler[Any, Any]:
        kw = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._single(handler.unary_unary, method, credential, False), **kw)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._streamed(handler.unary_stream, method, credential, False), **kw)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._single(handler.stream_unary, method, credential, True), **kw)
        return grpc.stream_stream_rpc_method_handler(
            self._streamed(handler.stream_stream, method, credential, True), **kw)

    def _single(self, inner: Any, method: str, credential: str | None, streamed_in: bool
                ) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
        async def behaviour(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            failure: BaseException | None = None
            try:
                # Client streams: the credential is checked before the first message is read.
                await self.admit(method, credential, None if streamed_in else request, context)
                return await _maybe_await(inner(request, context))
            except BaseException as e:
                failure = e
                raise
            finally:
                self.finished(method, failure, context)

        return behaviour

    def _streamed(self, inner: Any, method: str, credential: str | None, streamed_in: bool
                  ) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]:
        async def behaviour(request: Any, context: grpc.aio.ServicerContext[Any, Any]
                            ) -> AsyncIterator[Any]:
            failure: BaseException | None = None
            try:
                await self.admit(method, credential, None if streamed_in else request, context)
                async for msg in _responses(inner(request, context)):
                    yield msg
            except BaseException as e:  # GeneratorExit too: the client went away
                failure = e
                raise
            finally:
                self.finished(method, failure, context)

        return behaviour


async def _maybe_await(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


async def _responses(result: Any) -> AsyncIterator[Any]:
    """Messages of a streaming handler, whether it yields them or writes via context.write."""
    if hasattr(result, "__aiter__"):
        async for msg in result:
            yield msg
    elif inspect.isawaitable(result):
        await result
