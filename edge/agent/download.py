"""Fetch one model version: signed manifest, resumable chunked files, verify, rename into place.

Files land in ``artifacts/.partial/<version>/``; after an interruption the next attempt asks
for each file from the bytes already on disk. Nothing is used before the manifest's Ed25519
signature and every file's size and sha256 check out; only then is the directory renamed to
``artifacts/<version>`` (one rename: a version on disk is whole or absent). A bad signature, a
tampered file or a truncated download raises ``ArtifactRejected``; the caller keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path

from core.durable import fsync_dir
from edge.agent.client import ControlClient, ControlError
from edge.agent.config import PARTIAL_DIR, check_version_name
from model.manifest import (
    MANIFEST_NAME,
    ArtifactIntegrityError,
    FileEntry,
    Manifest,
    sha256_file,
    verify_artifact,
)
from model.signing import SignatureError, verify_manifest

log = logging.getLogger(__name__)

# Called after each chunk is on disk: (file path in the artifact, bytes of it on disk, size).
ProgressFn = Callable[[str, int, int], None]


class ArtifactRejected(Exception):
    """A version failed verification: bad signature, tampered or truncated file."""


@dataclass
class DownloadStats:
    """What one download moved: bytes over the wire, bytes already on disk from before."""

    bytes_fetched: int = 0
    bytes_resumed: int = 0
    files_fetched: int = 0
    seconds: float = 0.0


def check_signed_manifest(
    public_pem: str, version: str, manifest_json: bytes, signature: bytes, key_id: str = ""
) -> Manifest:
    """The manifest, once its signature verifies and it names ``version``."""
    try:
        verify_manifest(public_pem, manifest_json, signature, key_id=key_id or None)
        manifest = Manifest.from_json_bytes(manifest_json)
    except (SignatureError, ArtifactIntegrityError) as e:
        raise ArtifactRejected(f"manifest of {version} rejected: {e}") from e
    if manifest.model_version != version:
        raise ArtifactRejected(f"asked for the manifest of {version}, got one of "
                               f"{manifest.model_version}")
    return manifest


async def download_version(
    client: ControlClient,
    version: str,
    artifacts_dir: Path,
    public_pem: str,
    *,
    attempts: int = 4,
    progress: ProgressFn | None = None,
) -> tuple[Path, DownloadStats]:
    """``artifacts_dir/<version>``, verified; fetched (or resumed) only where not on disk."""
    check_version_name(version)
    start = time.monotonic()
    stats = DownloadStats()
    signed = await client.get_manifest(version)
    try:
        manifest = check_signed_manifest(public_pem, version, signed.manifest_json,
                                         signed.signature, signed.key_id)
        final = artifacts_dir / version
        if await _already_there(final, manifest, signed.manifest_json):
            return final, stats
        partial = _partial_dir(artifacts_dir, version, signed.manifest_json)
        for entry in manifest.files:
            await _fetch_file(client, version, entry, partial, stats, attempts, progress)
        # The whole tree once more: exactly the listed files, nothing else, every hash right.
        await asyncio.to_thread(verify_artifact, partial, manifest)
        await asyncio.to_thread(_move_into_place, partial, final)
    except (ArtifactRejected, ArtifactIntegrityError) as e:
        log.error("model %s REJECTED, not installed: %s", version, e)
        raise ArtifactRejected(str(e)) from e
    stats.seconds = time.monotonic() - start
    log.info("model %s downloaded and verified: %.1f MB fetched, %.1f MB resumed from disk, "
             "%.1f s", version, stats.bytes_fetched / 1e6, stats.bytes_resumed / 1e6,
             stats.seconds)
    return final, stats


async def _already_there(final: Path, manifest: Manifest, manifest_json: bytes) -> bool:
    """True when ``final`` holds exactly this signed manifest's files; a bad copy is removed."""
    if not final.exists():
        return False
    try:
        same = (final / MANIFEST_NAME).read_bytes() == manifest_json
        if same:
            await asyncio.to_thread(verify_artifact, final, manifest)
            log.info("model %s is already on disk and verified", manifest.model_version)
            return True
        log.warning("%s holds another manifest than the cloud's; fetching it again", final)
    except (OSError, ArtifactIntegrityError) as e:
        log.warning("%s does not verify (%s); fetching it again", final, e)
    await asyncio.to_thread(shutil.rmtree, final)
    return False


def _partial_dir(artifacts_dir: Path, version: str, manifest_json: bytes) -> Path:
    """The work directory of ``version``, holding this manifest (another one starts over)."""
    partial = artifacts_dir / PARTIAL_DIR / version
    marker = partial / MANIFEST_NAME
    if partial.exists() and (not marker.exists() or marker.read_bytes() != manifest_json):
        # Bytes fetched for other files (a republished version) must not be resumed.
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        marker.write_bytes(manifest_json)
    return partial


async def _fetch_file(
    client: ControlClient,
    version: str,
    entry: FileEntry,
    partial: Path,
    stats: DownloadStats,
    attempts: int,
    progress: ProgressFn | None,
) -> None:
    """One file into ``partial``, resuming from what is on disk; checks size and sha256."""
    dest = partial / entry.path
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = dest.stat().st_size if dest.exists() else 0
    if have > entry.size:
        log.warning("%s is longer than the manifest says; fetching it again", dest)
        dest.unlink()
        have = 0
    if have == entry.size and await asyncio.to_thread(sha256_file, dest) == entry.sha256:
        stats.bytes_resumed += have
        return
    if have == entry.size:  # whole but wrong: resuming would keep the wrong bytes
        dest.unlink()
        have = 0
    stats.bytes_resumed += have
    for attempt in range(1, attempts + 1):
        try:
            have = await _stream_into(client, version, entry, dest, have, stats, progress)
        except ControlError as e:
            if not e.retryable or attempt == attempts:
                raise ArtifactRejected(
                    f"truncated download: {entry.path} stopped at {have} of {entry.size} bytes "
                    f"({e})") from e
            log.warning("download of %s/%s cut at %d of %d bytes (%s); resuming", version,
                        entry.path, have, entry.size, e.code)
            await asyncio.sleep(0.2 * 2**attempt)
            have = dest.stat().st_size
            continue
        if have == entry.size:
            break
        if attempt == attempts:
            raise ArtifactRejected(f"truncated download: {entry.path} ended at {have} of "
                                   f"{entry.size} bytes after {attempts} attempts")
        log.warning("stream of %s/%s ended at %d of %d bytes; resuming", version, entry.path,
                    have, entry.size)
    digest = await asyncio.to_thread(sha256_file, dest)
    if digest != entry.sha256:
        dest.unlink()  # never resume from bytes known to be wrong
        raise ArtifactRejected(f"tampered file: {entry.path} has sha256 {digest[:16]}..., the "
                               f"signed manifest says {entry.sha256[:16]}...")
    stats.files_fetched += 1


async def _stream_into(
    client: ControlClient,
    version: str,
    entry: FileEntry,
    dest: Path,
    have: int,
    stats: DownloadStats,
    progress: ProgressFn | None,
) -> int:
    """Append the file's bytes from ``have`` on; returns the bytes on disk after the stream."""
    with open(dest, "ab") as fh:
        try:
            # aclosing: leaving early (an error, a cancel) ends the stream at once.
            async with aclosing(client.fetch(version, entry.path, have)) as chunks:
                async for offset, data, total in chunks:
                    if total != entry.size:
                        raise ArtifactRejected(
                            f"the cloud says {entry.path} has {total} bytes, the signed "
                            f"manifest says {entry.size}")
                    if offset != have or have + len(data) > entry.size:
                        raise ArtifactRejected(
                            f"chunk of {entry.path} at offset {offset} (+{len(data)} bytes) "
                            f"does not continue the {have} bytes on disk within {entry.size}")
                    fh.write(data)
                    have += len(data)
                    stats.bytes_fetched += len(data)
                    if progress is not None:
                        progress(entry.path, have, entry.size)
        finally:
            # Whatever arrived is kept (and durable) for the next attempt to resume from.
            fh.flush()
            os.fsync(fh.fileno())
    return have


def _move_into_place(partial: Path, final: Path) -> None:
    """fsync every file, then rename the directory: the version appears whole or not at all."""
    for dirpath, _, filenames in os.walk(partial):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    if final.exists():
        shutil.rmtree(final)
    os.rename(partial, final)
    fsync_dir(final.parent)
    fsync_dir(partial.parent)
