"""Build an edge artifact from a checkpoint: an onnxruntime-genai model built with a pinned
recipe (``model/recipes.py``), its tokenizer, router calibration and a manifest that records the
artifact's perplexity against its source, written next to ``out_dir`` and renamed into place.

The ONNX graph, KV cache layout, weight quantization (MatMulNBits) and ``genai_config.json`` come
from onnxruntime-genai's model builder, run as a subprocess: it imports transformers and holds the
whole fp32 model in memory, and neither should stay in the calling process. The measurement
(``model/quality.py``) runs here, once the builder is done.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from core.durable import fsync_dir
from model.catalog import RECORD_FILE
from model.manifest import (
    CALIBRATION_FILE,
    Manifest,
    Quality,
    build_manifest,
    write_manifest,
)
from model.quality import QUALITY_BUDGET, SourceReference
from model.recipes import (
    AUTO,
    AUTO_CANDIDATES,
    PRECISIONS,
    QUANT_OPTIONS,
    RECIPES,
    Recipe,
    resolve_recipe,
)
from model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

BUILDER_MODULE = "onnxruntime_genai.models.builder"
# Architectures the builder exports and Tandem serves (see model/config.py).
SUPPORTED_ARCHITECTURES = frozenset({"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"})
# The checkpoint's tokenizer files, copied into the artifact verbatim.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# The recipe a checkpoint gets when neither the caller nor its catalog record names one.
DEFAULT_RECIPE = "int4"
__all__ = [
    "CALIBRATION_FILE",
    "QUANT_OPTIONS",
    "ExportError",
    "QualityBudgetError",
    "export_edge_artifact",
]


# Files the edge runtime cannot work without.
REQUIRED_FILES = ("genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json")
# Packages whose versions go into the manifest's created_by.
PROVENANCE_PACKAGES = (
    "tandem",
    "onnxruntime-genai",
    "onnxruntime",
    "onnx-ir",
    "transformers",
    "torch",
)
SPECIAL_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
_STDERR_TAIL = 4000


class ExportError(RuntimeError):
    """The model builder failed or produced an incomplete artifact."""


class QualityBudgetError(ExportError):
    """Recipe ``auto`` found no candidate within the perplexity budget."""


def export_edge_artifact(
    checkpoint_dir: Path,
    out_dir: Path,
    recipe: str | Recipe | None,
    base_version: str,
    *,
    model_version: str | None = None,
    timeout_s: float | None = None,
    measure: bool = True,
    calibrate: bool | None = None,
    budget: float = QUALITY_BUDGET,
) -> Manifest:
    """Export ``checkpoint_dir`` to an edge artifact at ``out_dir`` and return its manifest.

    ``recipe`` is a recipe or its name (``int4``, ``int8`` and ``fp32`` keep their pinned
    options); None takes the checkpoint's catalog record's recipe, else ``int4``; ``auto``
    builds the candidates smallest first and keeps the first within ``budget`` (relative
    perplexity). ``measure`` records perplexity against the source in the manifest.
    ``calibrate`` writes the router calibration measured on the artifact; None does so for a
    catalog model without a calibration of its own (the router's default threshold was measured
    on the shipped demo pair; federation writes its own). ``out_dir`` is replaced whole or not
    at all; ``model_version`` defaults to ``"{base_version}-{recipe name}"``.
    """
    checkpoint_dir, out_dir = Path(checkpoint_dir).resolve(), Path(out_dir).resolve()
    candidates = _candidates(checkpoint_dir, recipe)
    if len(candidates) > 1 and not measure:
        raise ValueError(f"recipe {AUTO!r} chooses by measurement; it needs measure=True")
    _check_inputs(checkpoint_dir, base_version)
    catalog_model = (checkpoint_dir / RECORD_FILE).is_file()
    if calibrate is None:
        calibrate = catalog_model and not (checkpoint_dir / CALIBRATION_FILE).is_file()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # The work dir sits beside out_dir so the final rename stays on one filesystem.
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=out_dir.parent))
    try:
        start = time.perf_counter()
        reference = SourceReference(checkpoint_dir) if measure else None
        chosen, artifact, quality = _build_within_budget(
            checkpoint_dir, work, candidates, reference, budget, timeout_s
        )
        if calibrate:
            _calibrate(checkpoint_dir, artifact)
        manifest = build_manifest(
            artifact,
            model_version=model_version or f"{base_version}-{chosen.name}",
            base_version=base_version,
            quantization=chosen.precision,
            created_by=_created_by(),
            recipe=chosen,
            quality=quality,
        )
        write_manifest(artifact, manifest)
        _fsync_tree(artifact)
        _swap_into_place(artifact, out_dir, work)
        log.info(
            "exported %s to %s (%s, %.1f MB%s) in %.1f s",
            checkpoint_dir,
            out_dir,
            chosen.name,
            manifest.total_size / 1e6,
            f", {quality.describe()}" if quality else "",
            time.perf_counter() - start,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if catalog_model:
        from model.catalog import record_export

        record_export(checkpoint_dir, out_dir, manifest, remember_recipe=len(candidates) > 1)
    return manifest


def _candidates(checkpoint_dir: Path, recipe: str | Recipe | None) -> list[Recipe]:
    """The recipes to build, in order: one, or ``auto``'s candidates smallest first."""
    if recipe is None:
        from model.catalog import recorded_recipe

        recipe = recorded_recipe(checkpoint_dir) or DEFAULT_RECIPE
    if recipe == AUTO:
        return [RECIPES[name] for name in AUTO_CANDIDATES]
    try:
        return [resolve_recipe(recipe)]
    except ValueError:
        others = ", ".join(n for n in RECIPES if n not in PRECISIONS)
        raise ValueError(
            f"quantization must be one of {', '.join(PRECISIONS)}, a recipe ({others}) or "
            f"{AUTO!r}; got {recipe!r}"
        ) from None


def _build_within_budget(
    checkpoint_dir: Path,
    work: Path,
    candidates: list[Recipe],
    reference: SourceReference | None,
    budget: float,
    timeout_s: float | None,
) -> tuple[Recipe, Path, Quality | None]:
    """Build each candidate until one is within ``budget``; a single one is kept regardless
    (publishing is where the budget is enforced)."""
    rejected: list[str] = []
    for candidate in candidates:
        artifact = work / f"artifact-{candidate.name}"
        _run_builder(checkpoint_dir, artifact, work / "cache", candidate, timeout_s)
        _finish_artifact(checkpoint_dir, artifact)
        quality = reference.measure(artifact) if reference is not None else None
        if quality is None or len(candidates) == 1 or quality.relative_change <= budget:
            if quality is not None and quality.relative_change > budget:
                log.warning("%s: %s, over the %.1f%% budget", candidate.name,
                            quality.describe(), budget * 100)
            return candidate, artifact, quality
        log.info("auto: %s is over budget (%s); trying the next recipe", candidate.name,
                 quality.describe())
        rejected.append(f"{candidate.name} {quality.relative_change:+.1%}")
        shutil.rmtree(artifact)
    raise QualityBudgetError(
        f"no recipe keeps {checkpoint_dir} within {budget:.1%} of its perplexity "
        f"({', '.join(rejected)})"
    )


def _calibrate(checkpoint_dir: Path, artifact: Path) -> None:
    """Measure the router's settings on the artifact itself and write its calibration.json."""
    from model.quality import ArtifactScorer, calibrate, write_calibration

    calibration = calibrate(ArtifactScorer(artifact), Tokenizer.from_dir(checkpoint_dir))
    write_calibration(artifact, calibration)
    log.info("calibrated %s: difficulty threshold %.3f, cascade threshold %s", artifact.name,
             calibration["difficulty_threshold"], calibration.get("cascade_threshold"))


def _check_inputs(checkpoint_dir: Path, base_version: str) -> None:
    if not base_version:
        raise ValueError("base_version must be a non-empty string")
    config_path = checkpoint_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{checkpoint_dir} has no config.json; is it a checkpoint directory?")
    if not any(checkpoint_dir.glob("*.safetensors")):
        raise ValueError(f"{checkpoint_dir} has no *.safetensors weights")
    # genai tokenizes with tokenizer.json; the builder needs tokenizer_config.json to load it.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (checkpoint_dir / name).is_file():
            raise ValueError(f"{checkpoint_dir} has no {name}; save the tokenizer beside the model")
    architectures = json.loads(config_path.read_text()).get("architectures") or ["<none>"]
    if architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"architecture must be one of {', '.join(sorted(SUPPORTED_ARCHITECTURES))}, "
            f"got {architectures[0]!r} in {config_path}"
        )


def _run_builder(
    checkpoint_dir: Path, out: Path, cache: Path, recipe: Recipe, timeout_s: float | None
) -> None:
    """Run the onnxruntime-genai model builder for the CPU execution provider."""
    cmd = [
        sys.executable,
        "-m",
        BUILDER_MODULE,
        "-i",
        str(checkpoint_dir),
        "-o",
        str(out),
        "-p",
        recipe.precision,
        "-e",
        "cpu",
        "-c",
        str(cache),
        "--extra_options",
        "hf_token=false",  # a local directory: never look up Hugging Face credentials
        *recipe.options,
    ]
    env = os.environ | {
        # No downloads at export time, and no writes to the user's Hugging Face cache.
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(cache / "hf"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    log.debug("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise ExportError(f"model builder did not finish within {timeout_s} s") from e
    log.debug("model builder stdout:\n%s", proc.stdout)
    if proc.returncode != 0:
        tail = proc.stderr[-_STDERR_TAIL:]
        log.error("model builder failed (exit %d); stderr:\n%s", proc.returncode, tail)
        last = next((line for line in reversed(tail.splitlines()) if line.strip()), "no stderr")
        raise ExportError(
            f"onnxruntime-genai model builder failed for {checkpoint_dir} ({recipe.name}) "
            f"with exit code {proc.returncode}: {last}"
        )


def _finish_artifact(checkpoint_dir: Path, artifact: Path) -> None:
    """Make tokenizer and special token ids match the checkpoint, and check completeness."""
    # The builder re-saves the tokenizer through transformers, which rewrites
    # tokenizer_config.json (drops add_bos_token, renames the class). Ship the checkpoint's own
    # files byte for byte, so an edge node tokenizes exactly as the cloud does.
    for name in (*TOKENIZER_FILES, CALIBRATION_FILE):
        if (checkpoint_dir / name).is_file():
            shutil.copyfile(checkpoint_dir / name, artifact / name)
    missing = [name for name in REQUIRED_FILES if not (artifact / name).is_file()]
    if missing:
        raise ExportError(f"model builder output lacks {', '.join(missing)}")
    # The builder takes special ids from generation_config.json and the tokenizer before
    # config.json, and may add the tokenizer's eos; config.json is our source of truth.
    config = json.loads((checkpoint_dir / "config.json").read_text())
    genai_path = artifact / "genai_config.json"
    genai = json.loads(genai_path.read_text())
    changed = False
    for key in SPECIAL_TOKEN_KEYS:
        value = config.get(key)
        if value is not None and genai["model"].get(key) != value:
            log.warning(
                "genai_config %s: builder wrote %r, config.json says %r; using config.json",
                key,
                genai["model"].get(key),
                value,
            )
            genai["model"][key] = value
            changed = True
    if changed:
        genai_path.write_text(json.dumps(genai, indent=4) + "\n")


def _created_by() -> str:
    """The tool and the versions of every package that shaped the artifact."""
    versions = []
    for package in PROVENANCE_PACKAGES:
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue
    return f"tandem model.export ({', '.join(versions)})"


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under root, so a crash after the rename finds data."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(Path(dirpath) / name, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(dirpath))



def _swap_into_place(new: Path, out_dir: Path, work: Path) -> None:
    """Rename ``new`` to ``out_dir``; an existing ``out_dir`` moves into ``work`` (removed later).

    Not one atomic step (that needs renameat2), but ``out_dir`` is only ever absent for the
    instant between two renames and is never half-written; on failure the old one is restored.
    """
    previous = work / "previous"
    had_previous = out_dir.exists() or out_dir.is_symlink()
    if had_previous:
        out_dir.rename(previous)
    try:
        new.rename(out_dir)
    except BaseException:
        if had_previous:
            previous.rename(out_dir)
        raise
    fsync_dir(out_dir.parent)
