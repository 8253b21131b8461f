"""The agent loop inside ``tandem edge run``: heartbeats, model sync with hot swap, outcome
reports. It shares the event loop with the inference server and must never take it down:
every control-plane failure is logged and retried with backoff while the node keeps serving.

Heartbeats say what the node serves (and loads), its load and health; the reply names the
version it should serve. When that differs, the version is downloaded and verified
(``download.py``) and swapped in (``EdgeEngine.swap_to``); ``node.json`` then records it as
current and the one before as previous, and both stay on disk so a rollback needs no download.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import shutil
import time

from core.errors import TandemError
from edge.agent.client import ControlClient, ControlError, Outcome
from edge.agent.config import (
    PARTIAL_DIR,
    AgentConfig,
    NodeConfig,
    read_node_config,
    write_node_config,
)
from edge.agent.download import ArtifactRejected, download_version
from edge.engine import EdgeEngine

log = logging.getLogger(__name__)


class Backoff:
    """Exponential delays with jitter (so a fleet doesn't retry in lockstep)."""

    def __init__(self, first_s: float, max_s: float) -> None:
        self.first_s, self.max_s = first_s, max_s
        self._next = first_s

    def next(self) -> float:
        delay = self._next
        self._next = min(self.max_s, self._next * 2)
        return delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self._next = self.first_s


class EdgeAgent:
    """Keeps one node in step with the cloud: what it serves, and how that goes."""

    def __init__(self, config: AgentConfig, node: NodeConfig, engine: EdgeEngine,
                 client: ControlClient) -> None:
        self.config = config
        self.node = node
        self.engine = engine
        self.client = client
        client.credential = node.credential
        self._interval_s = config.heartbeat_s
        self._sync: asyncio.Task[bool] | None = None
        self._syncing = ""  # the version being downloaded or swapped in
        self._failed: dict[str, tuple[float, float]] = {}  # version -> (retry at, delay)
        self._rate = (time.monotonic(), engine.tokens_generated)
        self._window_start = time.monotonic()
        self.engine.take_outcomes()  # the server's warm-up generation is not traffic

    @property
    def serving(self) -> str:
        return self.engine.info.served_by.model_version

    async def run(self) -> None:
        """Heartbeat and report until cancelled; then one last report, best effort."""
        reports = asyncio.create_task(self._report_loop())
        try:
            await self._heartbeat_loop()
        finally:
            reports.cancel()
            if self._sync is not None:
                self._sync.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(reports, *(t for t in (self._sync,) if t is not None),
                                     return_exceptions=True)
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self.report(), self.config.rpc_timeout_s)

    # ---- heartbeats and sync --------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        backoff = Backoff(self.config.backoff_min_s, self.config.backoff_max_s)
        while True:
            try:
                desired = await self.heartbeat()
                backoff.reset()
                self._maybe_sync(desired)
                delay = self._interval_s
            except ControlError as e:
                delay = backoff.next()
                if e.code == "UNAUTHENTICATED":
                    self._reload_credential()
                log.warning("heartbeat to %s failed (%s); still serving %s; retrying in "
                            "%.1f s", self.client.address, e, self.serving, delay)
            except Exception:
                delay = backoff.next()
                log.exception("heartbeat failed unexpectedly; retrying in %.1f s", delay)
            await asyncio.sleep(delay)

    async def heartbeat(self) -> str:
        """One heartbeat; returns the version the cloud wants served ("" for none)."""
        load = self.engine.load()
        now, tokens = time.monotonic(), self.engine.tokens_generated
        then, before = self._rate
        self._rate = (now, tokens)
        rate = (tokens - before) / (now - then) if now > then else 0.0
        desired, interval = await self.client.heartbeat(
            self.node.node_id, self.serving, self._syncing or self.engine.loading_version or "",
            load.in_flight, load.queue_depth, rate, self.engine.healthy)
        if interval is not None:
            self._interval_s = interval
        return desired

    def _maybe_sync(self, desired: str) -> None:
        if not desired or desired == self.serving:
            return
        if self._sync is not None and not self._sync.done():
            return  # one at a time; a newer desired version is picked up after this one
        retry_at, _ = self._failed.get(desired, (0.0, 0.0))
        if time.monotonic() < retry_at:
            return
        self._sync = asyncio.create_task(self.sync_to(desired), name=f"sync-{desired}")

    async def sync_to(self, version: str) -> bool:
        """Download, verify and swap to ``version``; False (and still serving) on failure."""
        old = self.serving
        self._syncing = version
        try:
            log.info("the cloud wants %s (serving %s): fetching it", version, old)
            path, _ = await download_version(
                self.client, version, self.config.artifacts_dir, self.node.manifest_public_key,
                attempts=self.config.fetch_attempts)
            await self.engine.swap_to(path)
        # TandemError: SwapFailed, or WrongState when the node began shutting down meanwhile.
        except (ArtifactRejected, TandemError, ControlError, OSError, ValueError) as e:
            self._failed_version(version, e)
            return False
        except Exception as e:  # a bug, but the node serves on and the heartbeat goes on
            log.exception("model sync to %s failed unexpectedly", version)
            self._failed_version(version, e)
            return False
        finally:
            self._syncing = ""
        self._failed.pop(version, None)
        self.node = dataclasses.replace(self.node, current_version=version,
                                        previous_version=old)
        write_node_config(self.config.data_dir, self.node)
        self._prune(keep={version, old})
        log.info("now serving %s; %s kept on disk for rollback", version, old)
        return True

    def _failed_version(self, version: str, err: Exception) -> None:
        """Log the failure and hold off retrying ``version`` (doubling each time)."""
        _, last = self._failed.get(version, (0.0, 0.0))
        delay = min(self.config.backoff_max_s * 10,
                    last * 2 if last else self.config.failed_version_retry_s)
        self._failed[version] = (time.monotonic() + delay, delay)
        log.error("could not move to model %s: %s; still serving %s; retrying it in %.0f s",
                  version, err, self.serving, delay)

    def _prune(self, keep: set[str]) -> None:
        """Remove versions other than current and previous, and abandoned partial downloads."""
        root = self.config.artifacts_dir
        for path in root.iterdir() if root.exists() else ():
            if path.is_dir() and path.name not in keep and path.name != PARTIAL_DIR:
                shutil.rmtree(path, ignore_errors=True)
                log.info("removed old model %s", path.name)
        shutil.rmtree(root / PARTIAL_DIR, ignore_errors=True)

    def _reload_credential(self) -> None:
        """A re-run of install may have re-enrolled the node: pick up its new credential."""
        try:
            fresh = read_node_config(self.config.data_dir)
        except (OSError, ValueError) as e:
            log.warning("could not re-read the node config: %s", e)
            return
        if fresh is not None and fresh.credential != self.node.credential:
            log.info("node credential changed on disk (re-enrolled); using the new one")
            self.node = dataclasses.replace(self.node, credential=fresh.credential)
            self.client.credential = fresh.credential
        else:
            log.error("the cloud refuses this node's credential; re-run `tandem edge install` "
                      "with a new join token (serving goes on meanwhile)")

    # ---- outcome reports ------------------------------------------------------------------

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.report_s)
            try:
                await self.report()
            except ControlError as e:
                # Dropped, not kept: one lost window only thins a canary's evidence.
                log.warning("outcome report failed (%s); its window is dropped", e)
            except Exception:
                log.exception("outcome report failed unexpectedly")

    async def report(self) -> None:
        """Send the outcomes per version since the last report (nothing when idle)."""
        now = time.monotonic()
        window_s, self._window_start = now - self._window_start, now
        outcomes = [
            Outcome(o.model_version, o.requests, o.errors, o.latency_p50_ms, o.latency_p99_ms)
            for o in self.engine.take_outcomes() if o.requests
        ]
        if outcomes and window_s > 0:
            await self.client.report(self.node.node_id, window_s, outcomes)
