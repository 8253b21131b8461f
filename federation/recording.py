"""What a run did, round by round: which nodes took part, their losses, bytes each way and
seconds, kept in ``<out-dir>/<run-id>/status.json`` for ``tandem fed status``.

``RecordingGrid`` sits between the strategy and Flower's Grid: it sees every message a round
sends and every reply, whatever the strategy (FedAvg, FedProx, a DP wrapper), and adds the
model package to the first message each node gets in the run.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from core.durable import write_atomic
from federation.configvalues import config_int

if TYPE_CHECKING:
    from flwr.proto.node_pb2 import NodeInfo
    from flwr.supercore.run import Run

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
# Where a message's config lives: the message API, then the legacy fit and evaluate forms.
CONFIG_KEYS = ("config", "fitins.config", "evaluateins.config")
# How often a round's replies are pulled (Flower's own loop waits 3 s between pulls).
POLL_S = 1.0


def record_bytes(content: RecordDict) -> int:
    """Payload bytes of a message: arrays plus config and metric values."""
    total = 0
    for arrays in content.array_records.values():
        total += sum(len(a.data) for a in arrays.values())
    for config in content.config_records.values():
        for value in config.values():
            total += len(value) if isinstance(value, (bytes, str)) else 8
    for metrics in content.metric_records.values():
        total += 8 * len(metrics)
    return total


@dataclass
class RunStatus:
    """The run's record, written atomically after every phase."""

    path: Path
    run_id: int
    config: dict[str, Any]
    base_version: str
    state: str = "running"
    started_at: float = field(default_factory=time.time)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    def phase(self, server_round: int, kind: str, entry: dict[str, Any]) -> None:
        """Record a round's train or evaluate exchange; several exchanges of one phase (the
        stages of secure aggregation) add up."""
        row = next((r for r in self.rounds if r["round"] == server_round), None)
        if row is None:
            row = {"round": server_round}
            self.rounds.append(row)
        old = row.get(kind)
        if old is not None:
            nodes = old["nodes"]
            for node, new in entry["nodes"].items():
                mine = nodes.setdefault(node, {"sent_bytes": 0, "received_bytes": 0})
                sent, received = mine["sent_bytes"], mine["received_bytes"]
                mine.update(new)
                mine["sent_bytes"] = sent + new["sent_bytes"]
                mine["received_bytes"] = received + new["received_bytes"]
            entry = {**entry, "nodes": nodes,
                     "sampled": max(old["sampled"], entry["sampled"]),
                     "seconds": round(old["seconds"] + entry["seconds"], 2),
                     "sent_bytes": old["sent_bytes"] + entry["sent_bytes"],
                     "received_bytes": old["received_bytes"] + entry["received_bytes"],
                     "failures": old["failures"] + entry["failures"]}
            entry["answered"] = sum(1 for n in nodes.values() if "site" in n)
        row[kind] = entry
        self.save()

    def finish(self, state: str, error: str = "", /, **result: Any) -> None:
        """End the run as ``state``; ``result`` joins the recorded result (``state`` and
        ``error`` are positional, so no result key can land in them)."""
        self.state, self.error = state, error
        self.result.update(result)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps({
            "run_id": self.run_id, "state": self.state, "error": self.error,
            "started_at": self.started_at, "updated_at": time.time(),
            "base_version": self.base_version, "config": self.config,
            "rounds": self.rounds, "result": self.result,
        }, indent=1, default=str))

    def site_metric(self, server_round: int, key: str) -> dict[str, float]:
        """Site name -> ``key`` from the evaluate phase of ``server_round``."""
        row = next((r for r in self.rounds if r["round"] == server_round), {})
        nodes = row.get("evaluate", {}).get("nodes", {})
        return {n["site"]: float(n[key]) for n in nodes.values() if key in n}


def read_status(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


class RecordingGrid(Grid):
    """A Grid that records each round into ``status`` and ships the model package once."""

    def __init__(self, grid: Grid, status: RunStatus, package: dict[str, str | bytes]) -> None:
        self.grid, self.status, self.package = grid, status, package
        self._packaged: set[int] = set()
        self.current_round = 0

    # Delegation: the strategy talks to this object as to Flower's grid.
    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages([self._with_package(m) for m in messages])

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Push, then pull replies until all are in or ``timeout`` passes (Flower's contract),
        recording the exchange. Pushing here, not through the wrapped grid's
        ``send_and_receive``, keeps each message id, so a reply the SuperLink writes for a
        node it declared unavailable is charged to that node; and replies are polled every
        second instead of every three."""
        out = [self._with_package(m) for m in messages]
        if not out:
            return []
        kind = out[0].metadata.message_type.split(".")[0]
        server_round = self._round_of(out[0])
        start = time.perf_counter()
        ids = list(self.grid.push_messages(out))
        node_of = {i: m.metadata.dst_node_id for i, m in zip(ids, out, strict=True) if i}
        sent = {m.metadata.dst_node_id: record_bytes(m.content) for m in out}
        # A reply's error may carry no reason (None, kept as null in the status file).
        failures: list[dict[str, str | None]] = [
            {"node": str(m.metadata.dst_node_id), "reason": "could not be pushed"}
            for i, m in zip(ids, out, strict=True) if not i]
        replies: list[Message] = []
        pending = set(node_of)
        end = None if timeout is None else time.monotonic() + timeout
        while pending:
            got = list(self.grid.pull_messages(pending))
            replies += got
            pending -= {r.metadata.reply_to_message_id for r in got}
            if not pending or (end is not None and time.monotonic() >= end):
                break
            time.sleep(POLL_S)
        seconds = time.perf_counter() - start
        nodes: dict[str, dict[str, Any]] = {}
        for reply in replies:
            node_id = node_of.get(reply.metadata.reply_to_message_id,
                                  reply.metadata.src_node_id)
            if reply.has_error():
                failures.append({"node": str(node_id), "reason": reply.error.reason})
                continue
            row: dict[str, Any] = {"sent_bytes": sent.get(node_id, 0),
                                   "received_bytes": record_bytes(reply.content)}
            # Metrics: a MetricRecord, or (legacy replies) a "fitres/evaluateres.metrics"
            # ConfigRecord.
            records: list[MetricRecord | ConfigRecord] = [
                *reply.content.metric_records.values(),
                *(r for k, r in reply.content.config_records.items()
                  if k.endswith(".metrics"))]
            for metrics in records:
                row.update({k: v for k, v in metrics.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
            site = reply.content.config_records.get("site")
            if site is not None:  # stages of secure aggregation answer without one
                row["site"] = str(site["name"])
            nodes[str(node_id)] = row
        failures += [{"node": str(node_of[i]), "reason": f"no reply within {timeout:g} s"}
                     for i in pending]
        self.status.phase(server_round, kind, {
            "sampled": len(out), "answered": sum(1 for n in nodes.values() if "site" in n),
            "seconds": round(seconds, 2),
            "sent_bytes": sum(sent.values()),
            "received_bytes": sum(n["received_bytes"] for n in nodes.values()),
            "nodes": nodes, "failures": failures,
        })
        log.info("round %d %s: %d of %d nodes answered in %.1f s", server_round, kind,
                 len(nodes), len(out), seconds)
        return replies

    def _round_of(self, message: Message) -> int:
        """The server round a message belongs to: its config says, or (legacy workflows) its
        group id."""
        configs = message.content.config_records
        for key in CONFIG_KEYS:
            if key in configs and "server-round" in configs[key]:
                return config_int(configs[key], "server-round")
        group = message.metadata.group_id
        return int(group) if group.isdigit() else self.current_round

    def _with_package(self, message: Message) -> Message:
        """The message, with the model package added for a node that has not had it."""
        node = message.metadata.dst_node_id
        configs = message.content.config_records
        key = next((k for k in CONFIG_KEYS if k in configs), None)
        if node in self._packaged or key is None:
            return message
        self._packaged.add(node)
        content = RecordDict(dict(message.content.items()))
        content[key] = ConfigRecord({**dict(configs[key].items()), **self.package})
        return Message(content=content, dst_node_id=node,
                       message_type=message.metadata.message_type,
                       group_id=message.metadata.group_id)
