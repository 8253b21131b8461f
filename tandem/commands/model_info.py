"""``tandem model info TARGET``: what a catalog model, a checkpoint or an edge artifact is.

Facts are gathered into a plain dict (``describe``), printed as aligned lines or as JSON. Reads
files only: no weights are loaded, so it answers in well under a second for any model size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def describe(target: str, models_dir: Path | None = None) -> dict[str, Any]:
    """Facts about ``target``: a catalog model name, an artifact or a checkpoint directory."""
    from model.catalog import RECORD_FILE, CatalogError, default_root, model_dir

    path = Path(target).expanduser()
    if not path.is_dir():
        root = models_dir or default_root()
        if not (root / target / RECORD_FILE).is_file():
            model_dir(target, root)  # raises CatalogError naming the known models
        path = root / target
    if (path / "manifest.json").is_file():
        return _artifact(path)
    if (path / "config.json").is_file():
        return _checkpoint(path)
    raise CatalogError(f"{path} is neither a catalog model, a checkpoint (config.json) nor an "
                       "edge artifact (manifest.json)")


def _checkpoint(path: Path) -> dict[str, Any]:
    from dataclasses import asdict

    from model.catalog import RECORD_FILE, exports, model_record
    from model.config import ModelArgs

    args = ModelArgs.from_file(path / "config.json")
    facts: dict[str, Any] = {
        "kind": "model",
        "path": str(path),
        "architecture": args.architecture,
        "parameters": args.num_parameters,
        "context": args.max_seq_len,
        "vocab_size": args.vocab_size,
        "size_bytes": _size(path),
        **_tokenizer_facts(path),
    }
    if (path / RECORD_FILE).is_file():
        record = model_record(path.name, path.parent)
        facts |= {"name": record.name, "source": record.source,
                  "edge_recipe": record.edge_recipe or "int4 (default)"}
        facts["record"] = asdict(record)
    facts["artifacts"] = [
        {k: e.get(k) for k in ("artifact", "model_version", "recipe", "size_bytes", "quality")}
        for e in exports(path)
    ]
    return facts


def _artifact(path: Path) -> dict[str, Any]:
    from model.manifest import CALIBRATION_FILE, read_manifest

    manifest = read_manifest(path)
    genai = json.loads((path / "genai_config.json").read_text())["model"]
    calibration = None
    if (path / CALIBRATION_FILE).is_file():
        calibration = json.loads((path / CALIBRATION_FILE).read_text())
    return {
        "kind": "edge artifact",
        "path": str(path),
        "model_version": manifest.model_version,
        "base_version": manifest.base_version,
        "quantization": manifest.quantization,
        "recipe": manifest.recipe.to_dict() if manifest.recipe else None,
        "architecture": genai.get("type"),
        "context": int(genai["context_length"]),
        "vocab_size": int(genai["vocab_size"]),
        "size_bytes": manifest.total_size,
        "created_by": manifest.created_by,
        **_tokenizer_facts(path),
        "quality": manifest.quality.to_dict() if manifest.quality else None,
        "calibration": calibration,
    }


def _tokenizer_facts(path: Path) -> dict[str, Any]:
    from model.chat import template_source
    from model.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    source = template_source(config)
    lines = [line for line in (source or "").splitlines() if line.strip()]
    bos = tokenizer.bos_id
    return {
        "chat_template": source is not None,
        "chat_template_first_line": lines[0] if lines else None,
        "bos": None if bos is None else {"id": bos, "token": tokenizer.backend.id_to_token(bos),
                                         "added": tokenizer.adds_bos},
        "eos": [{"id": i, "token": tokenizer.backend.id_to_token(i)}
                for i in sorted(tokenizer.eos_ids)],
    }


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def quality_words(quality: dict[str, Any] | None) -> str:
    """"+2.4% (67.33 vs 65.76)", or "not measured"."""
    if not quality:
        return "not measured"
    return (f"{quality['relative_change']:+.1%} (perplexity {quality['artifact_perplexity']:.2f} "
            f"vs source {quality['source_perplexity']:.2f})")


def render(facts: dict[str, Any]) -> list[str]:
    """The lines ``tandem model info`` prints."""
    title = facts.get("name") or facts.get("model_version") or facts["path"]
    rows: list[tuple[str, str]] = [("path", facts["path"])]
    if facts["kind"] == "edge artifact":
        recipe = facts["recipe"]
        rows += [("version", f"{facts['model_version']} (from {facts['base_version']})"),
                 ("recipe", f"{recipe['name']}: {facts['quantization']} "
                            f"{' '.join(recipe['options'])}" if recipe
                  else f"{facts['quantization']} (not recorded)")]
    else:
        rows.append(("parameters", f"{facts['parameters'] / 1e6:.1f}M"))
    rows += [
        ("architecture", str(facts["architecture"])),
        ("context", f"{facts['context']} tokens, vocabulary {facts['vocab_size']}"),
        ("size", f"{facts['size_bytes'] / 1e6:.1f} MB"),
        ("chat template", f"yes: {facts['chat_template_first_line'][:70]}"
         if facts["chat_template"] else "none (prompts only)"),
        ("bos", "none" if facts["bos"] is None else
         f"{facts['bos']['token']} ({facts['bos']['id']}), "
         f"{'added to prompts' if facts['bos']['added'] else 'not added to prompts'}"),
        ("eos", ", ".join(f"{e['token']} ({e['id']})" for e in facts["eos"])),
    ]
    if facts["kind"] == "edge artifact":
        rows.append(("quality", quality_words(facts["quality"])))
        calibration = facts["calibration"]
        rows.append(("calibration", "none: the router's default threshold applies"
                     if calibration is None else
                     f"difficulty threshold {calibration['difficulty_threshold']}"
                     + (f", cascade threshold {calibration['cascade_threshold']}"
                        if "cascade_threshold" in calibration else "")))
    else:
        if "edge_recipe" in facts:
            rows.append(("edge recipe", facts["edge_recipe"]))
        for e in facts["artifacts"]:
            rows.append(("artifact", f"{e['model_version']} ({e['recipe']}, "
                         f"{(e['size_bytes'] or 0) / 1e6:.0f} MB): {quality_words(e['quality'])}"
                         f" at {e['artifact']}"))
        if not facts["artifacts"]:
            rows.append(("artifacts", "none built yet: `tandem model export`"))
    return [f"{title} ({facts['kind']})", *(f"  {k:<14}{v}" for k, v in rows)]
