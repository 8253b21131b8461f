"""Hugging Face style checkpoint directories: ``config.json`` + ``*.safetensors`` (+ tokenizer).

Tandem adds one file, ``tandem.json``, with the checkpoint's version and provenance (how it was
trained, its measured perplexities). Loading builds the model on the meta device and assigns the
mmapped tensors, so nothing is initialised twice and a large checkpoint loads in seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from model.config import ModelArgs
from model.transformer import Transformer

log = logging.getLogger(__name__)

METADATA_FILE = "tandem.json"
WEIGHTS_FILE = "model.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(Exception):
    """A checkpoint directory is missing files or does not match its config."""


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}") from None


def load_checkpoint(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: str | torch.dtype | None = None,
) -> Transformer:
    """Load a checkpoint directory into our decoder (in eval mode) on ``device``."""
    path = Path(path)
    config = path / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{path} has no config.json; is it a checkpoint directory?")
    files = weight_files(path)
    if not files:
        raise CheckpointError(f"{path} has no *.safetensors weights")
    if absent := [f.name for f in files if not f.is_file()]:
        raise CheckpointError(f"{path} lacks the weight shards {absent[:3]} its index names")
    try:
        args = ModelArgs.from_file(config)
    except ValueError as e:
        raise CheckpointError(f"{config}: {e}") from e
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f, device=str(device)))
    # Older exports carry the rotary table as a buffer; we compute it.
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if args.tie_word_embeddings:
        state["lm_head.weight"] = state.get("model.embed_tokens.weight", torch.empty(0))
    target = resolve_dtype(dtype) or resolve_dtype(args.torch_dtype) or torch.float32
    state = {k: v.to(target) for k, v in state.items()}

    with torch.device("meta"):
        model = Transformer(args)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match its config.json: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.reset_rope(device)
    return model.eval()


def weight_files(path: Path) -> list[Path]:
    """The safetensors files that hold the HF model's weights, in name order.

    The shard index names them where there is one; otherwise ``model*.safetensors`` if any, so
    a second copy in another layout next to them (Mistral's ``consolidated.safetensors``) is
    not mixed in; otherwise every ``*.safetensors``.
    """
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = set(json.loads(index.read_text())["weight_map"].values())
        return sorted(path / n for n in names)
    return sorted(path.glob("model*.safetensors")) or sorted(path.glob("*.safetensors"))


def save_checkpoint(
    model: Transformer,
    path: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    metadata: dict[str, Any] | None = None,
    dtype: str | None = None,
) -> Path:
    """Write ``model`` as an HF checkpoint directory, atomically (temp dir, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    target = resolve_dtype(dtype) or next(model.parameters()).dtype
    dtype_name = next(k for k, v in DTYPES.items() if v == target)
    state = {k: v.detach().to("cpu", target).contiguous() for k, v in model.state_dict().items()}
    if model.args.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # HF convention: tied weights are stored once

    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        cfg = model.args.to_hf_config() | {"torch_dtype": dtype_name}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if tokenizer_dir is not None:
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
        meta = dict(metadata or {})
        meta.setdefault("version", f"{meta.get('name', 'model')}-{weights_digest(tmp)[:12]}")
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for f in tmp.iterdir():
            f.chmod(0o644)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint is meant to be shared
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved checkpoint %s (%s)", path, dtype_name)
    return path


def weights_digest(path: str | Path) -> str:
    """sha256 over the checkpoint's weight files, in name order."""
    h = hashlib.sha256()
    for f in sorted(Path(path).glob("*.safetensors")):
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The checkpoint's ``tandem.json`` (empty for a plain HF directory)."""
    f = Path(path) / METADATA_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def checkpoint_version(path: str | Path) -> str:
    """The version recorded in ``tandem.json``, else one derived from the weights' hash."""
    meta = read_metadata(path)
    return str(meta.get("version") or f"{Path(path).name}-{weights_digest(path)[:12]}")
