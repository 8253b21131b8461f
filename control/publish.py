"""Publish an edge artifact as a model version: verify it, store its files, sign, register.

This is what ``tandem model publish DIR`` runs (and, later, federation's publish step). The
order matters: files are stored before the signed version is registered, so a version that
nodes can see always has every file in the store. Publishing the same artifact again returns
the existing version; the rollout controller then decides which nodes get it.

The quality gate: an export records the artifact's perplexity against its source checkpoint in
the manifest (``model/quality.py``). An artifact more than ``max_ppl_increase`` (3%) worse is
refused unless ``allow_degraded``, which publishes it with a warning. An artifact without a
measurement (exported before exports measured, or with the measurement off) is published with a
warning: refusing it would strand every version built so far, and its files are still verified.
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
from model.manifest import Manifest, read_manifest, verify_artifact
from model.quality import QUALITY_BUDGET

log = logging.getLogger(__name__)


class QualityGateError(WrongState):
    """The artifact's perplexity is too far above its source checkpoint's to publish."""


@dataclasses.dataclass(frozen=True)
class QualityVerdict:
    """What the gate says about one manifest: ``passed``, and the words for people."""

    measured: bool
    passed: bool
    message: str


def check_quality(manifest: Manifest, max_ppl_increase: float = QUALITY_BUDGET
                  ) -> QualityVerdict:
    """Judge the manifest's recorded perplexity against ``max_ppl_increase`` (0.03 = 3%)."""
    q = manifest.quality
    if q is None:
        return QualityVerdict(False, True, (
            f"{manifest.model_version} carries no perplexity measurement (exported before "
            "exports measured it, or without it): published without the quality gate; "
            "re-export it to measure"))
    words = (f"{manifest.model_version} ({q.describe()}; limit "
             f"{max_ppl_increase:+.1%})")
    if q.relative_change > max_ppl_increase:
        return QualityVerdict(True, False, (
            f"edge artifact {manifest.model_version} is {q.relative_change:.1%} worse than its "
            f"source: perplexity {q.artifact_perplexity:.2f} vs {q.source_perplexity:.2f}, over "
            f"the {max_ppl_increase:.1%} limit; export it with a better recipe (`tandem model "
            "export --recipe auto`), or pass --allow-degraded to publish it anyway"))
    return QualityVerdict(True, True, f"quality within budget: {words}")


def publish_model(
    target: ControlData | str | Path,
    artifact_dir: str | Path,
    *,
    notes: str = "",
    model_version: str | None = None,
    parent_version: str | None = None,
    make_current: bool | None = None,
    max_ppl_increase: float = QUALITY_BUDGET,
    allow_degraded: bool = False,
) -> tuple[ModelVersion, bool]:
    """Register the artifact at ``artifact_dir``; returns ``(version, created)``.

    ``target`` is an open ``ControlData`` or a data directory. ``model_version`` renames the
    version (the manifest's own name otherwise); ``parent_version`` defaults to the fleet's
    current version; ``make_current`` None makes it current only for a fleet with no version
    yet (the first publish), True at once (skipping any rollout), False never. Raises
    ArtifactIntegrityError when the files don't match the artifact's manifest, WrongState when
    the name is taken by other files, QualityGateError when the artifact's perplexity is more
    than ``max_ppl_increase`` above its source's and not ``allow_degraded``.
    """
    if not max_ppl_increase >= 0.0:
        raise ValueError(f"max_ppl_increase must be >= 0, got {max_ppl_increase}")
    if not isinstance(target, ControlData):
        with ControlData.open(target) as data:
            return publish_model(data, artifact_dir, notes=notes, model_version=model_version,
                                 parent_version=parent_version, make_current=make_current,
                                 max_ppl_increase=max_ppl_increase,
                                 allow_degraded=allow_degraded)
    data, artifact_dir = target, Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    # Every listed file, byte for byte, and nothing unlisted: a partial or edited export
    # must never reach a node.
    verify_artifact(artifact_dir, manifest)
    verdict = check_quality(manifest, max_ppl_increase)
    if not verdict.measured:
        log.warning("%s", verdict.message)
    elif not verdict.passed and not allow_degraded:
        raise QualityGateError(verdict.message)
    elif not verdict.passed:
        log.warning("PUBLISHING A DEGRADED ARTIFACT (--allow-degraded): %s", verdict.message)
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
