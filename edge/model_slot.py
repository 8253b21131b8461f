"""The edge engine's model slot: which loaded artifact new requests go to, and replacing it.

Loading verifies every file of an artifact (size and sha256, in ``EdgeRuntime.load``), checks
its tokenizer's special ids against genai_config.json and gives the model threads of its own.
A swap loads the new artifact beside the old one and warms it up (``prepare``); the engine then
points new requests at it (``switch``), and ``retire`` waits for the old model's requests to
finish before it releases that model. A rollback is the same swap to the previous artifact.

No requests, admission or streaming here (``engine.py`` decides who runs on which model and
ends requests); no torch and no transformers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from core.engine_api import EngineInfo, ServedBy
from core.errors import TandemError, Unavailable
from edge.config import EdgeEngineConfig
from edge.runtime import EdgeRuntime
from edge.sequence import LoadedModel
from model.manifest import CALIBRATION_FILE, Manifest, read_manifest
from model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# A swapped-in model decodes this before it takes traffic (first-call allocations, every weight
# touched), as the server's warm-up does at start.
_WARMUP_PROMPT = "Return the"


class SwapFailed(TandemError):
    """A new model could not be loaded or warmed up; the old one keeps serving."""

    status = "FAILED_PRECONDITION"


class ModelSlot:
    """The model new requests go to, the version a swap is loading, and models still draining."""

    def __init__(self, config: EdgeEngineConfig) -> None:
        self.config = config
        artifact = Path(config.artifact_dir)
        # Info comes from the manifest and genai_config.json alone, so it is there while the
        # model loads (the servicer answers Info before health turns SERVING).
        genai = json.loads((artifact / "genai_config.json").read_text())
        self.info = _engine_info(
            config, read_manifest(artifact), int(genai["model"]["context_length"])
        )
        self.current: LoadedModel | None = None
        self.loading: str | None = None  # the version a swap is loading and warming up
        self.swap_lock = asyncio.Lock()  # one swap at a time
        self._retiring: set[LoadedModel] = set()  # swapped out, finishing their requests

    async def start(self) -> LoadedModel:
        """Verify and load the configured artifact; new requests go to it."""
        model = await self._load(Path(self.config.artifact_dir))
        self.current, self.info = model, model.info
        return model

    async def prepare(
        self, artifact: Path, old: LoadedModel, shutting_down: Callable[[], bool]
    ) -> LoadedModel | None:
        """Verify, load and warm up ``artifact`` beside ``old``; None when it is ``old``'s version.

        Raises ``SwapFailed`` when it does not verify, load or warm up, or the node began
        shutting down meanwhile: then nothing changed and ``old`` keeps serving.
        """
        try:
            version = read_manifest(artifact).model_version
            if version == old.version:
                log.info("edge engine: already serving %s; nothing to swap", version)
                return None
            self.loading = version
            new = await self._load(artifact)  # verifies every file's size and sha256
            try:
                await asyncio.get_running_loop().run_in_executor(
                    new.decode_pool, _warm_up, new
                )
                if shutting_down():
                    raise Unavailable("the node began shutting down during the swap")
            except BaseException:
                new.close()
                raise
        except Exception as e:
            log.error("swap to %s failed; still serving %s: %s", artifact, old.version, e)
            raise SwapFailed(
                f"edge node {self.config.node_id} could not swap to {artifact}: {e}; "
                f"it keeps serving {old.version}"
            ) from e
        finally:
            self.loading = None
        return new

    def switch(self, new: LoadedModel) -> None:
        """New requests go to ``new`` from now on; the model it replaces drains until ``retire``."""
        if self.current is not None:
            self._retiring.add(self.current)
        self.current, self.info = new, new.info

    async def retire(
        self, old: LoadedModel, end_requests_on: Callable[[LoadedModel], None]
    ) -> None:
        """Let the requests pinned to ``old`` finish (up to swap_drain_s), then release it;
        ``end_requests_on(old)`` ends those still running when the time is up."""
        try:
            await asyncio.wait_for(old.idle.wait(), self.config.swap_drain_s)
        except TimeoutError:
            end_requests_on(old)
        finally:
            self._retiring.discard(old)
            old.close()
        log.info("edge engine %s: released %s", self.config.node_id, old.version)

    def close(self) -> None:
        """Release every model, serving or draining (after ``stop`` ended their requests)."""
        for model in (self.current, *self._retiring):
            if model is not None:
                model.close()
        self._retiring.clear()
        self.current = None

    async def _load(self, artifact: Path) -> LoadedModel:
        """Verify and load an artifact off the event loop, with threads of its own."""
        runtime = await asyncio.to_thread(EdgeRuntime.load, artifact, threads=self.config.threads)
        tokenizer = await asyncio.to_thread(Tokenizer.from_dir, artifact)
        eos_ok = tokenizer.eos_id in runtime.eos_token_ids
        if tokenizer.bos_id != runtime.bos_token_id or not eos_ok:
            raise ValueError(
                f"{artifact}: tokenizer special ids (bos {tokenizer.bos_id}, eos "
                f"{tokenizer.eos_id}) disagree with genai_config.json (bos "
                f"{runtime.bos_token_id}, eos {runtime.eos_token_ids}); re-export the artifact"
            )
        slots = self.config.max_concurrency
        return LoadedModel(
            runtime,
            tokenizer,
            _engine_info(self.config, runtime.manifest, runtime.max_context),
            ThreadPoolExecutor(2 * slots, thread_name_prefix="edge-decode"),
            ThreadPoolExecutor(2, thread_name_prefix="edge-score"),
            read_difficulty_threshold(artifact),
        )


def _engine_info(config: EdgeEngineConfig, manifest: Manifest, max_context: int) -> EngineInfo:
    return EngineInfo(
        served_by=ServedBy("edge", config.node_id, manifest.model_version),
        model_name=manifest.base_version,
        max_context=max_context,
        max_new_tokens=min(config.limits.max_new_tokens, max_context - 1),
        precision=manifest.quantization,
    )


def _warm_up(model: LoadedModel) -> None:
    """Worker thread: one short greedy generation on a model that takes no traffic yet."""
    ids = model.tokenizer.encode(_WARMUP_PROMPT, add_bos=True)
    for _ in model.runtime.generate(ids, 2):
        pass


def read_difficulty_threshold(artifact: Path) -> float | None:
    """The calibrated threshold an artifact carries (``calibration.json``), or None."""
    try:
        raw = json.loads((artifact / CALIBRATION_FILE).read_text())
        value = float(raw["difficulty_threshold"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as e:
        log.warning("%s: unreadable %s (%s); the router's threshold applies", artifact,
                    CALIBRATION_FILE, e)
        return None
    return value if math.isfinite(value) else None
