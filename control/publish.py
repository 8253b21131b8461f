"""Publish an edge artifact as a model version: verify it, store its files, sign, register.

This is what ``tandem model publish DIR`` runs (and, later, federation's publish step). The
order matters: files are stored before the signed version is registered, so a version that
nodes can see always has every file in the store. Publishing the same artifact again returns
the existing version; the rollout controller then decides which nodes get it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

from control.datadir import ControlData
from control.records import ModelVersion
from control.validate import check_version_name
from core.errors import NotFound, WrongState
from model.manifest import read_manifest, verify_artifact

log = logging.getLogger(__name__)


def publish_model(
    target: ControlData | str | Path,
    artifact_dir: str | Path,
    *,
    notes: str = "",
    model_version: str | None = None,
    parent_version: str | None = None,
    make_current: bool | None = None,
) -> tuple[ModelVersion, bool]:
    """Register the artifact at ``artifact_dir``; returns ``(version, created)``.

    ``target`` is an open ``ControlData`` or a data directory. ``model_version`` renames the
    version (the manifest's own name otherwise); ``parent_version`` defaults to the fleet's
    current version; ``make_current`` None makes it current only for a fleet with no version
    yet (the first publish), True at once (skipping any rollout), False never. Raises
    ArtifactIntegrityError when the files don't match the artifact's manifest, WrongState when
    the name is taken by other files.
    """
    if not isinstance(target, ControlData):
        with ControlData.open(target) as data:
            return publish_model(data, artifact_dir, notes=notes, model_version=model_version,
                                 parent_version=parent_version, make_current=make_current)
    data, artifact_dir = target, Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    # Every listed file, byte for byte, and nothing unlisted: a partial or edited export
    # must never reach a node.
    verify_artifact(artifact_dir, manifest)
    if model_version and model_version != manifest.model_version:
        manifest = dataclasses.replace(manifest, model_version=model_version)
    check_version_name(manifest.model_version)
    manifest_json = manifest.to_json_bytes()
    manifest_sha256 = hashlib.sha256(manifest_json).hexdigest()
    try:
        existing = data.store.version(manifest.model_version)
    except NotFound:
        existing = None
    if existing is not None:
        if existing.manifest_sha256 != manifest_sha256:
            raise WrongState(
                f"model version {manifest.model_version} is already published with other "
                "files; publish this artifact under a new name (--version)")
        log.info("%s is already published", manifest.model_version)
        # add_version of the same manifest registers nothing, but honours make_current.
        return data.store.add_version(existing, make_current=make_current)
    data.artifacts.put_dir(artifact_dir, manifest)
    if parent_version is None:
        parent_version = data.store.current_version()
    record, created = data.store.add_version(
        ModelVersion(
            version=manifest.model_version,
            manifest_path=str(data.artifacts.manifest_path(manifest.model_version)
                              .relative_to(data.artifacts.root)),
            manifest_json=manifest_json,
            manifest_sha256=manifest_sha256,
            signature=data.key.sign(manifest_json),
            key_id=data.key.key_id,
            base_version=manifest.base_version,
            parent_version=parent_version,
            quantization=manifest.quantization,
            total_size=manifest.total_size,
            created_at=0.0,  # set by the store
            notes=notes,
        ),
        make_current=make_current,
    )
    if created:
        log.info("published %s (%s, %.1f MB, signed by %s)", record.version,
                 record.quantization, record.total_size / 1e6, record.key_id)
    return record, created
