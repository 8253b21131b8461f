"""``tandem edge run``: serve the node's current model and run the agent loop beside it.

The version in ``node.json`` is served with ``start_edge_server``; a node installed before any
model was published first waits (heartbeating) for the cloud to name one. SIGTERM or SIGINT
drains like every Tandem server (health NOT_SERVING, accepted requests finish), then the agent
sends its last outcome report and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from core.engine_server import EngineServer
from core.grpc_server import ServerConfig, wait_for_signal
from core.metrics import MetricsConfig
from edge.agent.client import ControlClient, ControlError
from edge.agent.config import AgentConfig, NodeConfig, read_node_config, write_node_config
from edge.agent.download import ArtifactRejected, download_version
from edge.agent.loop import Backoff, EdgeAgent
from edge.config import EdgeEngineConfig
from edge.engine import EdgeEngine
from edge.server import EdgeServerConfig, start_edge_server
from federation.processes import SuperNodeConfig, supernode_process
from model.manifest import ArtifactIntegrityError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeRunConfig:
    """The agent's config and how the node's engine and server run (address from node.json)."""

    agent: AgentConfig
    max_concurrency: int = 4
    max_queue: int = 16
    threads: int | None = None
    grace_s: float = 10.0
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    # The node's Flower SuperNode, supervised beside serving (None: no federated learning).
    supernode: SuperNodeConfig | None = None

    def server_config(self, node: NodeConfig) -> EdgeServerConfig:
        return EdgeServerConfig(
            engine=EdgeEngineConfig(
                artifact_dir=self.agent.artifact(node.current_version),
                node_id=node.node_id,
                max_concurrency=self.max_concurrency,
                max_queue=self.max_queue,
                threads=self.threads,
            ),
            server=ServerConfig(host=node.listen_host, port=node.listen_port,
                                grace_s=self.grace_s),
            metrics=self.metrics,
        )


def load_node(config: AgentConfig) -> NodeConfig:
    node = read_node_config(config.data_dir)
    if node is None:
        raise FileNotFoundError(
            f"no node config in {config.data_dir}; enroll first with `tandem edge install "
            f"--cloud HOST:PORT --token TOKEN --data-dir {config.data_dir}`")
    return node


async def first_version(config: AgentConfig, node: NodeConfig, client: ControlClient) -> NodeConfig:
    """Heartbeat until the cloud names a version, fetch it; the node config that serves it."""
    backoff = Backoff(config.backoff_min_s, config.backoff_max_s)
    while True:
        try:
            desired, interval = await client.heartbeat(node.node_id, "", "", 0, 0, 0.0,
                                                       healthy=False)
            if desired:
                await download_version(client, desired, config.artifacts_dir,
                                       node.manifest_public_key, attempts=config.fetch_attempts)
                node = dataclasses.replace(node, current_version=desired)
                write_node_config(config.data_dir, node)
                return node
            backoff.reset()
            delay = interval or config.heartbeat_s
            log.info("no edge model published yet; asking again in %.0f s", delay)
        except (ControlError, ArtifactRejected, OSError) as e:
            delay = backoff.next()
            log.warning("could not get a first model (%s); retrying in %.1f s", e, delay)
        await asyncio.sleep(delay)


async def serve_node(config: NodeRunConfig, stop: asyncio.Future[None] | None = None) -> None:
    """Serve and sync until ``stop`` resolves (default: SIGINT/SIGTERM), then drain."""
    stopping: asyncio.Future[None] = stop if stop is not None else asyncio.ensure_future(
        wait_for_signal())
    node = load_node(config.agent)
    async with ControlClient(node.cloud, node.credential,
                             timeout_s=config.agent.rpc_timeout_s) as client:
        if not node.current_version:
            fetch = asyncio.ensure_future(first_version(config.agent, node, client))
            either: set[asyncio.Future[Any]] = {fetch, stopping}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if not fetch.done():
                fetch.cancel()
                return  # stopped before there was anything to serve
            node = fetch.result()
        server, node = await _start_server(config, node)
        assert isinstance(server.engine, EdgeEngine)
        agent = EdgeAgent(config.agent, node, server.engine, client)
        agent_task = asyncio.create_task(agent.run(), name="edge-agent")
        agent_task.add_done_callback(_agent_ended)
        supernode = None
        if config.supernode is not None:
            # Training happens in the SuperNode's ClientApp processes, beside serving: the
            # site's data stays in its data path; a crash there never stops serving.
            supernode = asyncio.create_task(
                supernode_process(config.supernode).supervise(), name="supernode")
            log.info("Flower SuperNode for %s joining %s (site data %s)", node.node_id,
                     config.supernode.superlink, config.supernode.data_path)
        log.info("edge node %s serving %s on %s; cloud %s", node.node_id, node.current_version,
                 node.inference_address, node.cloud)
        try:
            await stopping  # serving goes on even if the agent died (that is logged)
        finally:
            log.info("draining (grace %.1f s)", config.grace_s)
            # The agent heartbeats through the drain (healthy=False), then sends its last report.
            await server.stop()
            for task in (agent_task, supernode):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task


async def _start_server(config: NodeRunConfig, node: NodeConfig) -> tuple[EngineServer, NodeConfig]:
    """Serve the current version; if it no longer verifies or loads, the previous one."""
    try:
        return await start_edge_server(config.server_config(node)), node
    except (ArtifactIntegrityError, OSError, ValueError) as e:
        if not node.previous_version:
            raise
        log.error("cannot serve %s (%s); falling back to the previous version %s",
                  node.current_version, e, node.previous_version)
        # node.json is left as it is: the agent fetches the desired version again and records
        # it once it serves.
        node = dataclasses.replace(node, current_version=node.previous_version,
                                   previous_version="")
        return await start_edge_server(config.server_config(node)), node


def _agent_ended(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the edge agent stopped: %r; serving goes on without model sync",
                  task.exception())
