"""The one gate for API keys: a grpc.aio server interceptor over every non-public method.

``ApiKeyInterceptor`` wraps each method handler, so the check runs inside the RPC's own task
with the request message in hand: it verifies the ``x-api-key`` metadata with ``KeyStore``
(UNAUTHENTICATED when missing, malformed, unknown or revoked; UNAVAILABLE when the key store
can't answer), refuses a Generate whose ``route`` the key may not use (PERMISSION_DENIED), and
sets ``router.keys.CURRENT_KEY`` for the servicer and rate limiter. Health checks and server
reflection pass without a key; any other method, known today or added later, needs one.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc

from core import convert
from core.auth import API_KEY_HEADER
from core.errors import PermissionDenied, TandemError
from core.grpc_server import abort
from protos.tandem.v1 import inference_pb2 as pb
from router.keys import CURRENT_KEY, AuthConfig, KeyRecord, KeyStore

log = logging.getLogger(__name__)

# Method-name prefixes served without a key: load balancers and grpcurl must reach them.
PUBLIC_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
)


def _route(request: Any) -> str | None:
    """The route a Generate request asks for; None for other messages (and unknown enum values,
    which the servicer answers with INVALID_ARGUMENT)."""
    if isinstance(request, pb.GenerateRequest):
        return convert.ROUTE_NAMES.get(request.route)
    return None


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Admits an RPC only with a valid key allowed its route; the key lands in CURRENT_KEY."""

    def __init__(self, store: KeyStore, public: Sequence[str] = PUBLIC_PREFIXES,
                 on_reject: Callable[[str, str], None] | None = None) -> None:
        self.store = store
        self.public = tuple(public)
        # on_reject(method, status): refused calls never reach the servicer that counts RPCs.
        self.on_reject = on_reject

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(self.public):
            return handler  # unknown methods stay UNIMPLEMENTED
        token = next((v for k, v in details.invocation_metadata or () if k == API_KEY_HEADER),
                     None)
        if isinstance(token, bytes):
            token = token.decode(errors="replace")
        return self._wrap(handler, token, details.method.rsplit("/", 1)[-1])

    async def _admit(self, token: str | None, request: Any,
                     context: grpc.aio.ServicerContext, method: str = "") -> None:
        """Verify, check the route, publish the key; aborts the RPC on any refusal."""
        record: KeyRecord | None = None
        try:
            record = await self.store.verify(token)
            route = _route(request)
            if route is not None and not record.allows(route):
                raise PermissionDenied(
                    f"API key {record.key_id} may not use route {route!r} (it may use "
                    f"{', '.join(record.routes)}): send one of those, or use a key created "
                    f"with --routes including {route}")
        except TandemError as e:
            if self.on_reject is not None:
                self.on_reject(method, e.status)
            await abort(context, e)
        # No reset: each RPC runs in its own task (its own context), which ends with it.
        CURRENT_KEY.set(record)

    def _wrap(self, handler: grpc.RpcMethodHandler, token: str | None, method: str
              ) -> grpc.RpcMethodHandler:
        admit = functools.partial(self._admit, method=method)
        kw = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await admit(token, request, context)
                return await _maybe_await(inner_uu(request, context))

            return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)
        if handler.unary_stream:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext
                                   ) -> AsyncIterator[Any]:
                await admit(token, request, context)
                async for msg in _responses(inner_us(request, context)):
                    yield msg

            return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)
        # Client-streaming methods: the key is checked before the first message is read.
        if handler.stream_unary:
            inner_su = handler.stream_unary

            async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                await admit(token, None, context)
                return await _maybe_await(inner_su(requests, context))

            return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)
        inner_ss = handler.stream_stream

        async def stream_stream(requests: Any, context: grpc.aio.ServicerContext
                                ) -> AsyncIterator[Any]:
            await admit(token, None, context)
            async for msg in _responses(inner_ss(requests, context)):
                yield msg

        return grpc.stream_stream_rpc_method_handler(stream_stream, **kw)


async def _maybe_await(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


async def _responses(result: Any) -> AsyncIterator[Any]:
    """Messages of a streaming handler, whether it yields them or writes via context.write."""
    if hasattr(result, "__aiter__"):
        async for msg in result:
            yield msg
    elif inspect.isawaitable(result):
        await result


def auth_interceptors(config: AuthConfig, store: KeyStore | None,
                      on_reject: Callable[[str, str], None] | None = None
                      ) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors ``build_server`` needs: the key gate, or none when auth is off."""
    if not config.enabled:
        log.warning("API keys are OFF: every client is served without a key (development only)")
        return []
    if store is None:
        raise ValueError("auth is enabled but no key store was given (pass --redis-url)")
    return [ApiKeyInterceptor(store, on_reject=on_reject)]
