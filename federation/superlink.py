"""Flower's SuperLink beside the control plane: the cloud end of federated runs.

``supervised_superlink`` starts it, waits until it answers, records where it listens in the
control directory (``tandem fed run`` reads it there) and restarts it if it dies, until the
block ends. The control plane itself knows nothing of Flower: the command line composes the two.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from federation.processes import SuperLinkConfig, superlink_process
from federation.runner import LinkInfo

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def supervised_superlink(config: SuperLinkConfig, control_dir: Path,
                               healthy_timeout_s: float = 60.0) -> AsyncIterator[None]:
    """Run the SuperLink for the duration of the block (restarted with backoff if it dies)."""
    process = superlink_process(config).start()
    try:
        await asyncio.to_thread(process.wait_healthy, healthy_timeout_s)
    except BaseException:
        process.stop()
        raise
    LinkInfo.of(config.address, config.tls).save(control_dir)
    supervisor = asyncio.create_task(process.supervise(), name="superlink")
    log.info("Flower SuperLink on %s (log %s)", config.address, process.log_path)
    try:
        yield
    finally:
        supervisor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await supervisor
