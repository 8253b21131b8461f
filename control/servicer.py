"""tandem.v1.Control over gRPC: protobuf in, plain calls to the store and artifact store, protobuf
out; each typed error becomes one status code (``core.grpc_server.abort``).

Store calls block on SQLite (fsync on every commit) and file reads: they run in threads, so the
event loop keeps serving heartbeats while a node downloads. The node an RPC runs for is set in
``CURRENT_NODE`` by the gate in ``control.server`` (every method but Enroll and ListNodes
needs one); ListNodes runs for a router, named in ``CURRENT_ROUTER``.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from typing import Any, TypeVar

import grpc

from control.config import ControlConfig
from control.datadir import ControlData
from control.metrics import ControlMetrics
from control.records import NodeLoad, NodeRecord, NodeResources, VersionOutcome
from core.errors import DataLoss, InvalidRequest, PermissionDenied, TandemError, Unavailable
from core.grpc_server import Undecodable, abort, lenient
from model.manifest import ArtifactIntegrityError
from protos.tandem.v1 import control_pb2 as pb

log = logging.getLogger(__name__)

CONTROL_SERVICE = "tandem.v1.Control"
# The node the running RPC authenticated as; set in the RPC's own task by the gate.
CURRENT_NODE: ContextVar[str | None] = ContextVar("tandem_current_node", default=None)
# The router token id a ListNodes call authenticated with; set by the same gate.
CURRENT_ROUTER: ContextVar[str | None] = ContextVar("tandem_current_router", default=None)

T = TypeVar("T")
M = TypeVar("M")


async def _call(context: grpc.aio.ServicerContext, fn: Callable[..., T], *args: Any,
                **kwargs: Any) -> T:
    """Run a blocking store call in a thread; its typed errors end the RPC with their status."""
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except TandemError as e:
        await abort(context, e)
    except ArtifactIntegrityError as e:
        log.error("artifact store: %s", e)
        await abort(context, DataLoss(f"a stored manifest is damaged: {e}"))
    except sqlite3.OperationalError as e:
        # Another process held the database past the busy timeout: worth a retry, not a bug.
        log.warning("control database busy: %s", e)
        await abort(context, Unavailable("control database is busy; retry shortly",
                                         retry_after_s=1.0))


async def _parsed(request: M | Undecodable, context: grpc.aio.ServicerContext) -> M:
    if isinstance(request, Undecodable):
        await abort(context, InvalidRequest(f"request is not a valid protobuf message: "
                                            f"{request.reason}"))
    return request


async def _node_for(node_id: str, context: grpc.aio.ServicerContext) -> str:
    """The authenticated node, checked against the id a request names (if any)."""
    node = CURRENT_NODE.get()
    if node is None:  # the gate always sets it; a server built without the gate is a bug
        raise RuntimeError("Control RPC ran without the node gate")
    if node_id and node_id != node:
        await abort(context, PermissionDenied(
            f"this credential belongs to node {node}, not {node_id}; send the node's own "
            "credential"))
    return node


def node_status(node: NodeRecord, now: float, max_age_s: float) -> pb.NodeStatus:
    """A node as ListNodes describes it to routers."""
    status = pb.NodeStatus(
        node_id=node.node_id, hostname=node.hostname,
        inference_address=node.inference_address, served_version=node.served_version or "",
        desired_version=node.desired_version, healthy=node.healthy,
        live=node.is_live(now, max_age_s))
    if node.last_heartbeat is not None:
        status.last_heartbeat_age_s = max(0.0, now - node.last_heartbeat)
    return status


class ControlServicer:
    """The Control service: enrollment, heartbeats, signed manifests, artifact downloads, and
    the fleet's list for routers."""

    def __init__(self, data: ControlData, config: ControlConfig,
                 metrics: ControlMetrics | None = None) -> None:
        self.data = data
        self.config = config
        self.metrics = metrics or ControlMetrics()

    async def Enroll(self, raw: pb.EnrollRequest | Undecodable,
                     context: grpc.aio.ServicerContext) -> pb.EnrollResponse:
        req: pb.EnrollRequest = await _parsed(raw, context)
        res = req.resources
        enrollment = await _call(
            context, self.data.store.enroll, req.join_token,
            hostname=req.hostname, inference_address=req.inference_address,
            resources=NodeResources(res.cpu_cores, res.memory_bytes, tuple(res.cpu_features)),
            node_id=req.node_id)
        return pb.EnrollResponse(
            node_id=enrollment.node_id,
            node_credential=enrollment.credential,
            model_version=enrollment.model_version,
            heartbeat_interval_ms=self.config.heartbeat_interval_ms,
            manifest_public_key=self.data.key.public_pem,
        )

    async def Heartbeat(self, raw: pb.HeartbeatRequest | Undecodable,
                        context: grpc.aio.ServicerContext) -> pb.HeartbeatResponse:
        req: pb.HeartbeatRequest = await _parsed(raw, context)
        node = await _node_for(req.node_id, context)
        load = req.load
        desired = await _call(
            context, self.data.store.heartbeat, node,
            served_version=req.model_version, loading_version=req.loading_version,
            load=NodeLoad(load.in_flight, load.queue_depth, load.tokens_per_second),
            healthy=req.healthy)
        return pb.HeartbeatResponse(desired_model_version=desired,
                                    heartbeat_interval_ms=self.config.heartbeat_interval_ms)

    async def GetManifest(self, raw: pb.GetManifestRequest | Undecodable,
                          context: grpc.aio.ServicerContext) -> pb.ArtifactManifest:
        req: pb.GetManifestRequest = await _parsed(raw, context)
        if not req.model_version:
            await abort(context, InvalidRequest("model_version is required"))
        record = await _call(context, self.data.store.version, req.model_version)
        return pb.ArtifactManifest(model_version=record.version,
                                   manifest_json=record.manifest_json,
                                   signature=record.signature, key_id=record.key_id)

    async def FetchArtifact(self, raw: pb.FetchArtifactRequest | Undecodable,
                            context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ArtifactChunk]:
        """Chunks of one file from ``offset``; always at least one (it carries total_size)."""
        req: pb.FetchArtifactRequest = await _parsed(raw, context)
        if not req.model_version or not req.path:
            await abort(context, InvalidRequest("model_version and path are required"))
        # Registered versions only: files stored by a publish that never committed are not
        # served.
        await _call(context, self.data.store.version, req.model_version)
        reader = await _call(context, self.data.artifacts.open, req.model_version,
                             req.path, req.offset)
        try:
            while True:
                offset = reader.offset
                data = await asyncio.to_thread(reader.read, self.config.chunk_bytes)
                if data or offset == req.offset:
                    self.metrics.artifact_bytes.inc(len(data))
                    yield pb.ArtifactChunk(offset=offset, data=data,
                                           total_size=reader.total_size)
                if reader.offset >= reader.total_size:
                    return
                if not data:
                    # The blob shrank under us (size was checked at open): never a silent end.
                    await abort(context, DataLoss(f"{req.path} of {req.model_version} "
                                                  "ended early in the artifact store"))
        finally:
            reader.close()

    async def ReportOutcomes(self, raw: pb.OutcomeReport | Undecodable,
                             context: grpc.aio.ServicerContext) -> pb.OutcomeAck:
        req: pb.OutcomeReport = await _parsed(raw, context)
        node = await _node_for(req.node_id, context)
        outcomes = [
            VersionOutcome(o.model_version, o.requests, o.errors, o.escalations,
                           o.latency_p50_ms, o.latency_p99_ms)
            for o in req.outcomes
        ]
        await _call(context, self.data.store.record_outcomes, node, req.window_s, outcomes)
        return pb.OutcomeAck()

    async def ListNodes(self, raw: pb.ListNodesRequest | Undecodable,
                        context: grpc.aio.ServicerContext) -> pb.ListNodesResponse:
        await _parsed(raw, context)
        if CURRENT_ROUTER.get() is None:  # the gate always sets it; without it, a bug
            raise RuntimeError("ListNodes ran without the router gate")
        nodes = await _call(context, self.data.store.nodes)
        now = self.data.store.clock()
        # Live means what the fleet metrics mean: healthy, heard from in three intervals.
        max_age_s = 3 * self.config.heartbeat_interval_s
        return pb.ListNodesResponse(nodes=[node_status(n, now, max_age_s) for n in nodes])


def add_control_servicer(server: grpc.aio.Server, servicer: ControlServicer) -> None:
    """Register ``servicer`` as tandem.v1.Control with lenient request parsing."""
    ser = lambda m: m.SerializeToString()  # noqa: E731
    unary = grpc.unary_unary_rpc_method_handler
    handlers = {
        "Enroll": unary(servicer.Enroll, lenient(pb.EnrollRequest), ser),
        "Heartbeat": unary(servicer.Heartbeat, lenient(pb.HeartbeatRequest), ser),
        "GetManifest": unary(servicer.GetManifest, lenient(pb.GetManifestRequest), ser),
        "FetchArtifact": grpc.unary_stream_rpc_method_handler(
            servicer.FetchArtifact, lenient(pb.FetchArtifactRequest), ser),
        "ReportOutcomes": unary(servicer.ReportOutcomes, lenient(pb.OutcomeReport), ser),
        "ListNodes": unary(servicer.ListNodes, lenient(pb.ListNodesRequest), ser),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(CONTROL_SERVICE, handlers),))
