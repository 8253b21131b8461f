"""Router discovery: the backend pool follows the fleet the control plane knows.

``NodeDiscovery`` asks for the enrolled nodes every ``interval_s`` and adds each live node's
inference address to the ``BackendPool`` (which then health-checks it before any traffic), and
removes an address it added once its node has been gone or not live for ``remove_after_s``:
the router's own health checks stop new requests to a draining node at once, and the grace
lets its requests in flight finish before the channel closes. Static ``--backend`` addresses
are never removed. When the control plane can't be reached, the pool stays as it is: a
control-plane outage must not take serving nodes out of rotation. The decision
(``plan_changes``) is plain Python; ``ControlNodesClient`` is the thin grpc side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Protocol

import grpc

from protos.tandem.v1 import control_pb2 as pb
from protos.tandem.v1.control_pb2_grpc import ControlStub

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiscoveryConfig:
    """Where the control plane is, the router token that lets us list nodes, and how often."""

    control_address: str  # HOST:PORT of `tandem cloud control serve`
    token: str = ""  # from `tandem cloud token create --router`
    # A newly installed node gets traffic within this (plus one health check); listing a
    # thousand nodes every few seconds is still a small query on the control plane.
    interval_s: float = 3.0
    timeout_s: float = 2.0
    # Longer than a node's drain grace (10 s by default), so removing its channel cuts no
    # request; a flapping node is not re-added and re-removed every poll either.
    remove_after_s: float = 30.0

    def __post_init__(self) -> None:
        host, sep, port = self.control_address.rpartition(":")
        if not (host and sep and port.isdigit()):
            raise ValueError(f"control address must be HOST:PORT, got {self.control_address!r}")
        if not self.token:
            raise ValueError("discovery needs a router token (--control-token, env "
                             "TANDEM_ROUTER_TOKEN): make one with `tandem cloud token create "
                             "--router` on the control host")
        if not 0.1 <= self.interval_s <= 3600:
            raise ValueError(f"discovery interval must be 0.1..3600 s, got {self.interval_s}")
        if self.remove_after_s < 0:
            raise ValueError(f"remove_after_s must be >= 0, got {self.remove_after_s}")


@dataclass(frozen=True)
class DiscoveredNode:
    """A node as the control plane lists it."""

    node_id: str
    address: str
    version: str
    live: bool


class DiscoveryError(Exception):
    """The node list could not be had (the control plane is down, or refuses our token)."""


class Pool(Protocol):
    """What discovery needs of a ``BackendPool``."""

    async def add(self, address: str) -> object: ...

    async def remove(self, address: str) -> None: ...


class NodeLister(Protocol):
    """Where the node list comes from (``ControlNodesClient``; a stand-in in tests)."""

    async def list_nodes(self) -> list[DiscoveredNode]: ...

    async def close(self) -> None: ...


def plan_changes(nodes: Iterable[DiscoveredNode], owned: Collection[str],
                 static: Collection[str]) -> tuple[set[str], set[str]]:
    """``(add, remove)``: live addresses not yet in the pool, and ones we added that are gone.

    ``owned`` are the addresses discovery added earlier; ``static`` ones are configured and
    belong to no one else.
    """
    live = {n.address for n in nodes if n.live and n.address} - set(static)
    return live - set(owned), set(owned) - live


class NodeDiscovery:
    """Keeps ``pool`` in step with ``lister``'s node list; ``close`` also closes the lister."""

    def __init__(self, pool: Pool, lister: NodeLister, static: Collection[str],
                 interval_s: float, remove_after_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.lister = lister
        self.static = frozenset(static)
        self.interval_s = interval_s
        self.remove_after_s = remove_after_s
        self.clock = clock
        self.owned: set[str] = set()
        # Owned addresses not live at the last poll, and since when (removal waits a grace).
        self.leaving: dict[str, float] = {}
        self._failing = ""  # the last fetch error, so an outage is logged once, not per poll
        self._task: asyncio.Task[None] | None = None

    async def sync(self) -> bool:
        """One poll: fetch and apply; False (pool untouched) when the list can't be had."""
        try:
            nodes = await self.lister.list_nodes()
        except DiscoveryError as e:
            if str(e) != self._failing:
                log.warning("node discovery: %s; keeping the %d discovered backend(s) as they "
                            "are", e, len(self.owned))
            self._failing = str(e)
            return False
        if self._failing:
            log.info("node discovery: the control plane answers again")
            self._failing = ""
        add, remove = plan_changes(nodes, self.owned, self.static)
        live = {n.address: n for n in nodes if n.live}
        listed = {n.address for n in nodes}
        for address in sorted(add):
            log.info("node discovery: adding %s at %s (serves %s)", live[address].node_id,
                     address, live[address].version or "nothing yet")
            await self.pool.add(address)
            self.owned.add(address)
        now = self.clock()
        for address in set(self.leaving) - remove:
            del self.leaving[address]  # live again within the grace: nothing to do
        for address in sorted(remove):
            since = self.leaving.setdefault(address, now)
            if now - since < self.remove_after_s:
                continue
            why = "not live" if address in listed else "no longer enrolled at this address"
            log.info("node discovery: removing %s (%s for %.0f s)", address, why, now - since)
            await self.pool.remove(address)
            self.owned.discard(address)
            del self.leaving[address]
        return True

    def start(self) -> None:
        """Poll in the background every ``interval_s``."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="node discovery")

    async def close(self) -> None:
        """Stop polling (the pool keeps what it has) and close the lister."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.lister.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in one poll must not end discovery for good
                log.exception("node discovery poll failed")


class ControlNodesClient:
    """ListNodes over one channel to the control plane, with the router token."""

    def __init__(self, config: DiscoveryConfig) -> None:
        self.config = config
        self.channel = grpc.aio.insecure_channel(config.control_address, options=[
            # Back within a poll or two of a control-plane restart, not grpc's 120 s backoff.
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 5_000),
            # A fleet of thousands lists in well under this.
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ])
        self.stub = ControlStub(self.channel)
        self._metadata = (("authorization", f"Bearer {config.token}"),)

    async def list_nodes(self) -> list[DiscoveredNode]:
        """Every enrolled node; raises DiscoveryError with the status on failure."""
        try:
            reply = await self.stub.ListNodes(pb.ListNodesRequest(), metadata=self._metadata,
                                              timeout=self.config.timeout_s)
        except grpc.aio.AioRpcError as e:
            raise DiscoveryError(f"ListNodes on {self.config.control_address} failed: "
                                 f"{e.code().name}: {e.details()}") from None
        return [DiscoveredNode(n.node_id, n.inference_address, n.served_version, n.live)
                for n in reply.nodes]

    async def close(self) -> None:
        await self.channel.close()


async def start_discovery(pool: Pool, config: DiscoveryConfig,
                          static: Collection[str]) -> NodeDiscovery:
    """Poll the control plane once now (so live nodes count toward readiness), then in the
    background."""
    discovery = NodeDiscovery(pool, ControlNodesClient(config), static, config.interval_s,
                              config.remove_after_s)
    try:
        if not await discovery.sync():
            log.warning("node discovery: starting without the control plane's nodes; "
                        "retrying every %g s", config.interval_s)
    except BaseException:
        await discovery.close()
        raise
    discovery.start()
    return discovery
