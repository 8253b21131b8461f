"""The edge artifact's manifest: what the artifact is and the sha256 of every file in it.

``manifest.json`` sits at the artifact's root and is not listed in itself. Its bytes are
canonical JSON (sorted keys, no insignificant whitespace, ASCII only), so the exact file on disk
is what gets signed with Ed25519 and what an edge node verifies. Standard library only: the edge
agent imports this module without torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from core.durable import write_atomic
from model.recipes import PRECISIONS, Recipe

FORMAT = "onnxruntime-genai"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
QUANTIZATIONS = PRECISIONS
# Files at the artifact root that the manifest does not list (itself; the signature goes here).
UNLISTED_FILES = frozenset({MANIFEST_NAME})
_CHUNK = 1 << 20

# Beside the model files when the version was calibrated: the router's difficulty threshold
# for it (measured at export or by federation, read by the edge engine).
CALIBRATION_FILE = "calibration.json"


class ArtifactIntegrityError(Exception):
    """An artifact does not match its manifest, or the manifest itself is unreadable."""

    def __init__(
        self,
        message: str,
        *,
        missing: tuple[str, ...] = (),
        changed: tuple[str, ...] = (),
        unexpected: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.missing = missing
        self.changed = changed
        self.unexpected = unexpected


@dataclass(frozen=True)
class FileEntry:
    """One file of the artifact: POSIX path relative to the root, size in bytes, sha256 hex."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class TextQuality:
    """Perplexity of source and artifact on one held-out text's windows."""

    text: str
    windows: int
    source_perplexity: float
    artifact_perplexity: float


@dataclass(frozen=True)
class Quality:
    """The artifact's perplexity against its source checkpoint's, on the same token windows.

    ``relative_change`` is ``artifact / source - 1`` (0.03: 3% worse). ``tokens_sha256`` hashes
    the scored ids, so two measurements can be told to be on the same windows.
    """

    source_perplexity: float
    artifact_perplexity: float
    relative_change: float
    window_tokens: int
    tokens_sha256: str
    texts: tuple[TextQuality, ...]

    def __post_init__(self) -> None:
        # Canonical JSON has no NaN or Infinity, and a perplexity is at least 1.
        values = (self.source_perplexity, self.artifact_perplexity, self.relative_change,
                  *(p for t in self.texts for p in (t.source_perplexity, t.artifact_perplexity)))
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"quality values must be finite numbers, got {values}")
        if self.window_tokens < 2 or not self.texts or not _is_sha256(self.tokens_sha256):
            raise ValueError("quality needs texts, windows of >= 2 tokens and a sha256")

    def to_dict(self) -> dict[str, Any]:
        return {
            "source_perplexity": self.source_perplexity,
            "artifact_perplexity": self.artifact_perplexity,
            "relative_change": self.relative_change,
            "window_tokens": self.window_tokens,
            "tokens_sha256": self.tokens_sha256,
            "texts": [
                {"text": t.text, "windows": t.windows, "source_perplexity": t.source_perplexity,
                 "artifact_perplexity": t.artifact_perplexity}
                for t in self.texts
            ],
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Quality:
        return cls(
            source_perplexity=float(raw["source_perplexity"]),
            artifact_perplexity=float(raw["artifact_perplexity"]),
            relative_change=float(raw["relative_change"]),
            window_tokens=int(raw["window_tokens"]),
            tokens_sha256=str(raw["tokens_sha256"]),
            texts=tuple(
                TextQuality(str(t["text"]), int(t["windows"]), float(t["source_perplexity"]),
                            float(t["artifact_perplexity"]))
                for t in raw["texts"]
            ),
        )

    def describe(self) -> str:
        """One line for people: "perplexity 24.16 vs source 24.04 (+0.5%) on 12 x 512 tokens"."""
        windows = sum(t.windows for t in self.texts)
        return (f"perplexity {self.artifact_perplexity:.2f} vs source "
                f"{self.source_perplexity:.2f} ({self.relative_change:+.1%}) on {windows} x "
                f"{self.window_tokens} tokens of {', '.join(t.text for t in self.texts)}")


@dataclass(frozen=True)
class Manifest:
    """What an edge artifact is (versions, quantization, producer) and the files it holds.

    ``recipe`` (the builder options, ``model/recipes.py``) and ``quality`` (perplexity against
    the source) are None in manifests written before exports recorded them; they are left out
    of the JSON then, so those manifests keep their bytes and signatures.
    """

    format: str
    format_version: int
    model_version: str
    base_version: str
    quantization: str
    created_by: str
    files: tuple[FileEntry, ...]
    recipe: Recipe | None = None
    quality: Quality | None = None

    def __post_init__(self) -> None:
        if self.format != FORMAT:
            raise ValueError(f"format must be {FORMAT!r}, got {self.format!r}")
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"format_version must be {FORMAT_VERSION}, got {self.format_version}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}"
            )
        for name in ("model_version", "base_version", "created_by"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string")
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise ValueError("manifest lists a file twice")
        for entry in self.files:
            _check_relative(entry.path)
            if entry.size < 0 or not _is_sha256(entry.sha256):
                raise ValueError(f"bad size or sha256 for {entry.path!r}")
        # Sorted files make equal manifests byte-identical, whatever order they were built in.
        object.__setattr__(self, "files", tuple(sorted(self.files, key=lambda f: f.path)))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form."""
        out: dict[str, Any] = {
            "format": self.format,
            "format_version": self.format_version,
            "model_version": self.model_version,
            "base_version": self.base_version,
            "quantization": self.quantization,
            "created_by": self.created_by,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
        }
        if self.recipe is not None:
            out["recipe"] = self.recipe.to_dict()
        if self.quality is not None:
            out["quality"] = self.quality.to_dict()
        return out

    def to_json_bytes(self) -> bytes:
        """Canonical bytes: the exact content of ``manifest.json`` and the input to signing."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return text.encode("ascii")

    @classmethod
    def from_json_bytes(cls, data: bytes) -> Manifest:
        """Parse manifest bytes; raises ArtifactIntegrityError when they are malformed."""
        try:
            raw = json.loads(data)
            files = tuple(
                FileEntry(path=str(f["path"]), size=int(f["size"]), sha256=str(f["sha256"]))
                for f in raw["files"]
            )
            return cls(
                format=raw["format"],
                format_version=raw["format_version"],
                model_version=raw["model_version"],
                base_version=raw["base_version"],
                quantization=raw["quantization"],
                created_by=raw["created_by"],
                files=files,
                recipe=Recipe.from_dict(raw["recipe"]) if raw.get("recipe") else None,
                quality=Quality.from_dict(raw["quality"]) if raw.get("quality") else None,
            )
        except (ValueError, KeyError, TypeError) as e:
            raise ArtifactIntegrityError(f"malformed manifest: {e}") from e

    @property
    def total_size(self) -> int:
        """Bytes of all listed files (what a node downloads)."""
        return sum(f.size for f in self.files)


def _check_relative(path: str) -> None:
    # A manifest comes from the network: a path must never escape the artifact's root.
    p = PurePosixPath(path)
    if not path or p.is_absolute() or ".." in p.parts or "\\" in path or str(p) != path:
        raise ValueError(f"file path must be a normalized relative POSIX path, got {path!r}")


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def sha256_file(path: Path) -> str:
    """Streaming sha256 of a file, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _walk(root: Path) -> tuple[dict[str, Path], list[str]]:
    """Regular files under root by relative POSIX path, and paths that are not regular files."""
    files: dict[str, Path] = {}
    odd: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for name in sorted(dirnames):
            if (base / name).is_symlink():
                odd.append((base / name).relative_to(root).as_posix())
        for name in filenames:
            full = base / name
            rel = full.relative_to(root).as_posix()
            if rel in UNLISTED_FILES:
                continue
            if full.is_symlink() or not full.is_file():
                odd.append(rel)
            else:
                files[rel] = full
    return files, odd


def build_manifest(
    root: str | Path,
    *,
    model_version: str,
    base_version: str,
    quantization: str,
    created_by: str,
    recipe: Recipe | None = None,
    quality: Quality | None = None,
) -> Manifest:
    """Hash every file under ``root`` (except ``manifest.json``) into a new Manifest."""
    root = Path(root)
    files, odd = _walk(root)
    if odd:
        raise ValueError(f"artifact {root} holds links or special files: {', '.join(sorted(odd))}")
    entries = tuple(
        FileEntry(path=rel, size=full.stat().st_size, sha256=sha256_file(full))
        for rel, full in sorted(files.items())
    )
    return Manifest(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        model_version=model_version,
        base_version=base_version,
        quantization=quantization,
        created_by=created_by,
        files=entries,
        recipe=recipe,
        quality=quality,
    )


def write_manifest(root: str | Path, manifest: Manifest) -> Path:
    """Write ``root/manifest.json`` atomically (temp file, fsync, rename) and return its path."""
    root = Path(root)
    target = root / MANIFEST_NAME
    write_atomic(target, manifest.to_json_bytes())
    return target


def read_manifest(root: str | Path) -> Manifest:
    """Read ``root/manifest.json``; raises ArtifactIntegrityError if absent or malformed."""
    path = Path(root) / MANIFEST_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ArtifactIntegrityError(f"{path} is missing; is {root} an edge artifact?") from None
    return Manifest.from_json_bytes(data)


def verify_artifact(root: str | Path, manifest: Manifest) -> None:
    """Check that ``root`` holds exactly the manifest's files with their sizes and hashes."""
    root = Path(root)
    files, odd = _walk(root)
    missing: list[str] = []
    changed: list[str] = []
    for entry in manifest.files:
        full = files.pop(entry.path, None)
        if full is None:
            # A listed path that exists as a link or special file counts as changed.
            (changed if entry.path in odd else missing).append(entry.path)
            continue
        size = full.stat().st_size
        # Size first: a truncated download fails without hashing gigabytes.
        if size != entry.size or sha256_file(full) != entry.sha256:
            changed.append(entry.path)
    listed = {f.path for f in manifest.files}
    unexpected = sorted([*files, *(p for p in odd if p not in listed)])
    if missing or changed or unexpected:
        groups = (("missing", missing), ("changed", changed), ("unexpected", unexpected))
        parts = [f"{label}: {', '.join(names)}" for label, names in groups if names]
        raise ArtifactIntegrityError(
            f"artifact {root} does not match its manifest ({'; '.join(parts)})",
            missing=tuple(missing),
            changed=tuple(changed),
            unexpected=tuple(unexpected),
        )
