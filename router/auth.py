"""The one gate for API keys: a grpc.aio server interceptor over every non-public method.

``ApiKeyInterceptor`` is a ``core.auth.AuthInterceptor``, so the check runs inside the RPC's own
task with the request message in hand: it verifies the ``x-api-key`` metadata with ``KeyStore``
(UNAUTHENTICATED when missing, malformed, unknown or revoked; UNAVAILABLE when the key store
can't answer), refuses a Generate whose ``route`` the key may not use (PERMISSION_DENIED), and
sets ``router.keys.CURRENT_KEY`` for the servicer and rate limiter. Health checks and server
reflection pass without a key; any other method, known today or added later, needs one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from core import convert
from core.auth import API_KEY_HEADER, AuthInterceptor
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


class ApiKeyInterceptor(AuthInterceptor):
    """Admits an RPC only with a valid key allowed its route; the key lands in CURRENT_KEY."""

    def __init__(self, store: KeyStore, public: Sequence[str] = PUBLIC_PREFIXES,
                 on_reject: Callable[[str, str], None] | None = None) -> None:
        super().__init__(API_KEY_HEADER, public)
        self.store = store
        # on_reject(method, status): refused calls never reach the servicer that counts RPCs.
        self.on_reject = on_reject

    async def admit(self, method: str, credential: str | None, request: Any,
                    context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Verify, check the route, publish the key; aborts the RPC on any refusal."""
        record: KeyRecord | None = None
        try:
            record = await self.store.verify(credential)
            route = _route(request)
            if route is not None and not record.allows(route):
                raise PermissionDenied(
                    f"API key {record.key_id} may not use route {route!r} (it may use "
                    f"{', '.join(record.routes)}): send one of those, or use a key created "
                    f"with --routes including {route}")
        except TandemError as e:
            if self.on_reject is not None:
                self.on_reject(method.rsplit("/", 1)[-1], e.status)
            await abort(context, e)
        # No reset: each RPC runs in its own task (its own context), which ends with it.
        CURRENT_KEY.set(record)


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
