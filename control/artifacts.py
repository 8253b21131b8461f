"""A content-addressed artifact store on disk: each file once, named by its sha256.

Layout under ``root``::

    blobs/sha256/ab/abcdef...   file contents, read-only, shared by every version holding them
    manifests/<version>.json    the version's canonical manifest (it lists the blobs)
    tmp/                        work files; nothing here is ever read as an artifact

Every file is written to a temporary name in ``tmp/``, fsynced, renamed into place, and its
directory fsynced: a reader never sees half a file, and after a crash a file is either whole
or absent. Blobs go in before the manifest naming them, so a manifest never lists a missing
blob. Contents are hashed while copied, so what is stored is what the manifest promises.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import BinaryIO

from control.validate import check_version_name
from core.durable import atomic_writer, write_atomic
from core.errors import DataLoss, InvalidRequest, NotFound, OutOfRange
from model.manifest import (
    ArtifactIntegrityError,
    FileEntry,
    Manifest,
    read_manifest,
    sha256_file,
)

log = logging.getLogger(__name__)

_COPY_BYTES = 1 << 20
# Work files older than this are a crashed writer's leftovers (a live copy is never this slow).
STALE_TMP_S = 24 * 3600.0


class BlobReader:
    """One artifact file open for reading from an offset (a context manager)."""

    def __init__(self, fh: BinaryIO, entry: FileEntry, offset: int) -> None:
        self._fh = fh
        self.entry = entry
        self.offset = offset

    @property
    def total_size(self) -> int:
        return self.entry.size

    def read(self, max_bytes: int) -> bytes:
        """The next at most ``max_bytes`` bytes (b"" at the end); advances ``offset``."""
        data = self._fh.read(min(max_bytes, self.entry.size - self.offset))
        self.offset += len(data)
        return data

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> BlobReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ArtifactStore:
    """Edge artifacts by version, their files stored once by content."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs" / "sha256"
        self.manifests = self.root / "manifests"
        self.tmp = self.root / "tmp"
        for folder in (self.blobs, self.manifests, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        self._remove_stale_tmp()

    def _remove_stale_tmp(self) -> None:
        cutoff = time.time() - STALE_TMP_S
        for leftover in self.tmp.iterdir():
            try:
                if leftover.stat().st_mtime < cutoff:
                    leftover.unlink()
            except OSError:
                pass  # another process cleaned it up first

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / sha256[:2] / sha256

    def manifest_path(self, version: str) -> Path:
        check_version_name(version)
        return self.manifests / f"{version}.json"

    def put_dir(self, artifact_dir: str | Path, manifest: Manifest | None = None) -> Manifest:
        """Store the files of ``artifact_dir`` and its manifest; returns the stored manifest.

        ``manifest`` defaults to the directory's own ``manifest.json`` (pass one to store the
        files under another version name). Raises ArtifactIntegrityError when a file is missing
        or does not match its sha256.
        """
        artifact_dir = Path(artifact_dir)
        manifest = manifest or read_manifest(artifact_dir)
        stored = 0
        for entry in manifest.files:
            stored += self._put_blob(artifact_dir / entry.path, entry)
        # 0600, as before: only the control server reads them (nodes get them over gRPC).
        write_atomic(self.manifest_path(manifest.model_version), manifest.to_json_bytes(),
                     mode=0o600, tmp_dir=self.tmp)
        log.info("stored %s: %d files, %d new (%.1f MB)", manifest.model_version,
                 len(manifest.files), stored, manifest.total_size / 1e6)
        return manifest

    def _put_blob(self, source: Path, entry: FileEntry) -> bool:
        """Copy one file into its blob unless it is there; True when it was copied."""
        target = self.blob_path(entry.sha256)
        if target.is_file():
            # Written whole (by rename), so normally right; but a blob damaged on disk would
            # be handed to every node, so check it (publishing is rare, reading is cheap).
            if target.stat().st_size == entry.size and sha256_file(target) == entry.sha256:
                return False
            log.warning("blob %s in %s is damaged; storing it again", entry.sha256, self.root)
        target.parent.mkdir(exist_ok=True)
        digest = hashlib.sha256()
        # A blob never changes after it is written: read-only from the rename on.
        with atomic_writer(target, mode=0o444, tmp_dir=self.tmp) as out:
            try:
                with open(source, "rb") as src:
                    for block in iter(lambda: src.read(_COPY_BYTES), b""):
                        digest.update(block)
                        out.write(block)
            except FileNotFoundError:
                raise ArtifactIntegrityError(f"{source} is listed in the manifest but "
                                             "missing", missing=(entry.path,)) from None
            size = out.tell()
            if size != entry.size or digest.hexdigest() != entry.sha256:
                raise ArtifactIntegrityError(
                    f"{source} does not match its manifest entry (size {size}, expected "
                    f"{entry.size}; or its sha256 differs)", changed=(entry.path,))
        return True

    def has_version(self, version: str) -> bool:
        return self.manifest_path(version).is_file()

    def versions(self) -> list[str]:
        """Versions with a stored manifest, sorted by name."""
        return sorted(p.stem for p in self.manifests.glob("*.json"))

    def manifest_bytes(self, version: str) -> bytes:
        """The stored canonical manifest; raises NotFound."""
        try:
            return self.manifest_path(version).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"model version {version!r} has no artifact in the store") from None

    def manifest(self, version: str) -> Manifest:
        return Manifest.from_json_bytes(self.manifest_bytes(version))

    def open(self, version: str, path: str, offset: int = 0) -> BlobReader:
        """Open file ``path`` of ``version`` positioned at ``offset``.

        NotFound for an unknown version, InvalidRequest for a path the manifest does not list
        or a negative offset, OutOfRange for an offset past the end (== size is allowed: there
        is nothing left to read), DataLoss when the blob is gone or damaged on disk.
        """
        manifest = self.manifest(version)
        entry = next((f for f in manifest.files if f.path == path), None)
        if entry is None:
            raise InvalidRequest(
                f"{path!r} is not a file of model version {version} (its manifest lists "
                f"{', '.join(f.path for f in manifest.files)})")
        if offset < 0:
            raise InvalidRequest(f"offset must be >= 0, got {offset}")
        if offset > entry.size:
            raise OutOfRange(f"offset {offset} is past the end of {path} ({entry.size} bytes); "
                             "restart the download from 0")
        blob = self.blob_path(entry.sha256)
        try:
            fh = open(blob, "rb")  # noqa: SIM115 (BlobReader owns and closes it)
        except FileNotFoundError:
            log.error("blob %s of %s/%s is missing from %s", entry.sha256, version, path,
                      self.root)
            raise DataLoss(f"the artifact store lost {path} of {version}; republish it with "
                           "`tandem model publish`") from None
        size = os.fstat(fh.fileno()).st_size
        if size != entry.size:
            fh.close()
            log.error("blob %s is %d bytes, its manifest says %d", blob, size, entry.size)
            raise DataLoss(f"the artifact store's copy of {path} of {version} is damaged; "
                           "republish it with `tandem model publish`")
        fh.seek(offset)
        return BlobReader(fh, entry, offset)

