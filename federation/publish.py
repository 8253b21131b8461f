"""The step after a run: the federated model becomes a canary, or nothing, by its numbers.

The run's final model is compared with the model it started from on every site's held-out
documents (both measured by the sites in the same run: round 0 evaluates the start). Only a
model that beats the start on every site that measured both is exported (quantized, with its
router calibration), published (signed) and sent to canary nodes through the rollout
controller, which then promotes it or rolls it back on what the canaries serve. The checkpoint
is kept in the control plane's data directory so the next run starts from it.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"


@dataclass(frozen=True)
class Comparison:
    """Per-site perplexity before and after, and whether the new model is better."""

    start: dict[str, float]
    final: dict[str, float]
    better: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"start_ppl": self.start, "final_ppl": self.final, "better": self.better,
                "reason": self.reason}


def compare_sites(start: dict[str, float], final: dict[str, float], min_sites: int = 1
                  ) -> Comparison:
    """Better only when the final model has lower perplexity on every site measured both
    times, and at least ``min_sites`` were."""
    both = sorted(set(start) & set(final))
    if len(both) < min_sites:
        return Comparison(start, final, False,
                          f"only {len(both)} site(s) measured before and after (need "
                          f"{min_sites})")
    worse = [s for s in both if not final[s] < start[s]]
    words = ", ".join(f"{s} {start[s]:.2f} -> {final[s]:.2f}" for s in both)
    if worse:
        return Comparison(start, final, False,
                          f"not better on {', '.join(worse)} (held-out perplexity {words})")
    return Comparison(start, final, True, f"better on all {len(both)} sites ({words})")


def checkpoint_home(control_dir: Path) -> Path:
    """Where the control plane keeps the checkpoints behind published edge versions."""
    return Path(control_dir) / CHECKPOINTS_DIR


def find_checkpoint(control_dir: Path | None, version: str, fallbacks: list[Path]) -> Path | None:
    """The checkpoint whose version is ``version``: kept by an earlier run, or a fallback."""
    from model.checkpoint import checkpoint_version

    if control_dir is not None:
        kept = checkpoint_home(control_dir) / version
        if (kept / "config.json").is_file():
            return kept
    for path in fallbacks:
        if (path / "config.json").is_file() and checkpoint_version(path) == version:
            return path
    return None


def write_calibration(checkpoint: Path, threshold: float, quantile: float,
                      sites: dict[str, float]) -> None:
    """Record the router's difficulty threshold for this model beside its weights."""
    from model.export import CALIBRATION_FILE

    (checkpoint / CALIBRATION_FILE).write_text(json.dumps({
        "difficulty_threshold": round(threshold, 4),
        "quantile": quantile,
        "per_site": {k: round(v, 4) for k, v in sites.items()},
        "measured_on": "each site's held-out documents (prompt = first 48 tokens)",
    }, indent=1) + "\n")


def publish_candidate(checkpoint: Path, control_dir: Path, out_dir: Path, *,
                      quantization: str, comparison: Comparison, run_id: int,
                      canary_fraction: float = 0.0) -> dict[str, Any]:
    """Export, publish and canary ``checkpoint``; what was done, for the run's status."""
    from control.datadir import ControlData
    from control.publish import publish_model
    from control.rollout import RolloutConfig, RolloutController
    from core.errors import TandemError
    from model.checkpoint import checkpoint_version
    from model.export import export_edge_artifact

    base_version = checkpoint_version(checkpoint)
    kept = checkpoint_home(control_dir) / base_version
    if not kept.exists():
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(checkpoint, kept)
    artifact = out_dir / f"{base_version}-{quantization}"
    manifest = export_edge_artifact(kept, artifact, quantization, base_version)
    notes = f"federated run {run_id}: {comparison.reason}"
    with ControlData.open(control_dir) as data:
        record, created = publish_model(data, artifact, notes=notes[:2000], make_current=False)
        controller = RolloutController(data.store, RolloutConfig.load(control_dir))
        try:
            rollout = controller.start(record.version, canary_fraction or None)
        except TandemError as e:
            # Published either way: an operator can start the rollout once nodes are live.
            log.error("published %s but could not start its rollout: %s", record.version,
                      e.message)
            return {"published": record.version, "created": created, "rollout": None,
                    "rollout_error": e.message, "artifact_bytes": manifest.total_size}
    log.info("federated run %d: %s published and in canary on %s", run_id, record.version,
             ", ".join(rollout.canary_node_ids))
    return {"published": record.version, "created": created, "rollout": rollout.rollout_id,
            "canaries": list(rollout.canary_node_ids), "artifact_bytes": manifest.total_size}


def weighted_mean(values: dict[str, float], weights: dict[str, float]) -> float:
    """Mean of ``values`` weighted by ``weights`` (by key), ignoring NaNs."""
    pairs = [(v, weights.get(k, 1.0)) for k, v in values.items() if math.isfinite(v)]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else math.nan
