"""The federated task: the edge model, a site's data as token streams, local training and
evaluation, and what a round exchanges (Flower's ``task.py``).

A site receives the model once per run as a *package* (config, tokenizer and, when only
adapters travel, the base weights), cached in its data directory by base version; after that
a round carries only the exchanged tensors: every weight (``exchange = "full"``, fine for the
2.4M-parameter demo edge model) or the LoRA adapters (``"lora"``, what a large model needs).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load, save
from torch import Tensor

from core.durable import write_atomic
from federation.lora import add_lora, check_names, load_lora_state, lora_state
from federation.sitedata import SiteData
from model.checkpoint import CheckpointError, checkpoint_version, load_checkpoint
from model.tokenizer import Tokenizer
from model.train import TrainConfig, TrainResult, evaluate_nll, pack_documents, train
from model.transformer import Transformer

log = logging.getLogger(__name__)

FULL, LORA = "full", "lora"
EXCHANGES = (FULL, LORA)
# What a package holds of a checkpoint directory besides the weights.
PACKAGE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json")
WEIGHTS_KEY = "weights.safetensors"
CACHE_DIR = ".federation-models"


@dataclass(frozen=True)
class Exchange:
    """What a round sends: every weight, or LoRA adapters of ``rank`` on a frozen base."""

    kind: str = FULL
    lora_rank: int = 8
    lora_alpha: float = 16.0
    seed: int = 0  # the adapters' shared initialisation

    def __post_init__(self) -> None:
        if self.kind not in EXCHANGES:
            raise ValueError(f"exchange must be one of {EXCHANGES}, got {self.kind!r}")


# --- the model package -------------------------------------------------------------------------


def package_entries(checkpoint: Path, exchange: Exchange) -> dict[str, str | bytes]:
    """A checkpoint as ConfigRecord entries ``package/<file>``; weights only for LoRA (in full
    exchange the round's arrays carry them)."""
    entries: dict[str, str | bytes] = {"package/base-version": checkpoint_version(checkpoint)}
    for name in PACKAGE_FILES:
        if (checkpoint / name).is_file():
            entries[f"package/{name}"] = (checkpoint / name).read_text(encoding="utf-8")
    if exchange.kind == LORA:
        model = load_checkpoint(checkpoint, dtype="float32")
        entries[f"package/{WEIGHTS_KEY}"] = save(_stored_state(model))
    return entries


def unpack(entries: dict[str, object], cache_root: Path) -> Path:
    """Store a package found in a message's config under ``cache_root``; returns its directory.

    Files are added one by one, each atomically, and only when missing: a package cached by a
    full-exchange run (no base weights) gains them when a LoRA run sends them.
    """
    version = str(entries["package/base-version"])
    target = cache_root / CACHE_DIR / version
    target.mkdir(parents=True, exist_ok=True)
    for key, value in entries.items():
        name = key.removeprefix("package/")
        if key.startswith("package/") and key != "package/base-version" \
                and not (target / name).is_file():
            data = value if isinstance(value, bytes) else str(value).encode("utf-8")
            write_atomic(target / name, data)
    return target


def cached_package(version: str, cache_root: Path) -> Path:
    """The cached package of ``version``; raises FileNotFoundError naming what to do."""
    path = cache_root / CACHE_DIR / version
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"this site has no copy of base model {version}; the server sends it with the "
            "first message of a run to each node: rerun, or check that the node's data path "
            "is writable")
    return path


def build_model(package: Path, exchange: Exchange, weights: dict[str, Tensor] | None = None
                ) -> Transformer:
    """The model a site trains: the package's architecture with ``weights`` (full exchange)
    or the package's base weights plus fresh adapters (LoRA)."""
    from model.config import ModelArgs

    args = ModelArgs.from_file(package / "config.json")
    if exchange.kind == FULL:
        if weights is None:
            raise ValueError("a full exchange needs the round's weights")
        model = Transformer(args)
        _load_stored_state(model, weights)
        return model
    stored = package / WEIGHTS_KEY
    if not stored.is_file():
        raise CheckpointError(f"package {package} has no base weights for LoRA")
    model = Transformer(args)
    _load_stored_state(model, load(stored.read_bytes()))
    add_lora(model, exchange.lora_rank, exchange.lora_alpha, exchange.seed)
    if weights is not None:
        load_lora_state(model, weights)
    return model


def exchanged_names(package: Path) -> list[str]:
    """The names of a full exchange's tensors, in order (legacy messages carry only order)."""
    from model.config import ModelArgs

    with torch.device("meta"):
        model = Transformer(ModelArgs.from_file(package / "config.json"))
    names = list(model.state_dict())
    return [n for n in names if not (model.args.tie_word_embeddings and n == "lm_head.weight")]


def exchanged_state(model: Transformer, exchange: Exchange) -> dict[str, Tensor]:
    """What a round sends of ``model``: every stored weight, or only the adapters."""
    state = lora_state(model) if exchange.kind == LORA else _stored_state(model)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def _stored_state(model: Transformer) -> dict[str, Tensor]:
    """The state dict without the tied output head (it is the embedding, sent once)."""
    state = model.state_dict()
    if model.args.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def _load_stored_state(model: Transformer, state: dict[str, Tensor]) -> None:
    check_names(set(_stored_state(model)), set(state), "weight names")
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    model.reset_rope(torch.device("cpu"))
    model.eval()


# --- the site's data ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteTokens:
    """A site's documents as packed token streams."""

    train: Tensor
    heldout: Tensor
    documents: int
    escalations: int


def tokenize_site(site: SiteData, tokenizer: Tokenizer, escalation_repeat: int = 4) -> SiteTokens:
    """Pack the site's training documents (escalations repeated: few, and the ones that
    matter) and its held-out documents."""
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    texts = list(site.train) + [e.text for e in site.escalations] * max(1, escalation_repeat)
    train_ids = tokenizer.encode_batch(texts, add_bos=False) if texts else []
    held = tokenizer.encode_batch(list(site.heldout), add_bos=False) if site.heldout else []
    empty = torch.zeros(0, dtype=torch.long)
    return SiteTokens(
        pack_documents(train_ids, bos, eos) if train_ids else empty,
        pack_documents(held, bos, eos) if held else empty,
        len(site.train), len(site.escalations))


# --- training and evaluation -------------------------------------------------------------------


@dataclass(frozen=True)
class LocalTraining:
    """One site's share of a round: a few optimizer steps on its own stream."""

    steps: int = 20
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 5e-4
    prox_mu: float = 0.0  # FedProx: pull toward the round's global weights
    seed: int = 0


def train_locally(model: Transformer, tokens: Tensor, cfg: LocalTraining) -> TrainResult:
    """Fine-tune ``model`` in place on ``tokens``; a short warm-up, then cosine decay."""
    seq_len = min(cfg.seq_len, max(8, tokens.numel() - 2))
    return train(model, tokens, TrainConfig(
        steps=cfg.steps, batch_size=cfg.batch_size, seq_len=seq_len, lr=cfg.lr,
        warmup_steps=max(1, cfg.steps // 10), seed=cfg.seed, prox_mu=cfg.prox_mu,
        weight_decay=0.0, log_every=0))


def heldout_loss(model: Transformer, tokens: Tensor, seq_len: int = 128) -> tuple[float, int]:
    """Mean next-token NLL on ``tokens`` and how many tokens it covered."""
    seq_len = min(seq_len, tokens.numel() - 1)
    if seq_len < 8:
        raise ValueError(f"a site needs held-out documents to evaluate on (has "
                         f"{tokens.numel()} tokens)")
    nll = evaluate_nll(model, tokens, seq_len=seq_len)
    return nll, (tokens.numel() - 1) // seq_len * seq_len


@torch.no_grad()
def prompt_loss_quantile(model: Transformer, tokenizer: Tokenizer, texts: tuple[str, ...],
                         q: float, prompt_tokens: int = 48) -> float:
    """The ``q``-quantile over documents of the mean loss on their first ``prompt_tokens``
    tokens: the router's difficulty score of a prompt this site sees, so a threshold there
    sends the ``1 - q`` least familiar of this site's own prompts to the cloud."""
    losses = []
    for ids in tokenizer.encode_batch(list(texts), add_bos=True):
        ids = ids[:prompt_tokens + 1]
        if len(ids) < 3:
            continue
        x = torch.tensor(ids)[None]
        logits = model(x[:, :-1]).float()
        losses.append(float(torch.nn.functional.cross_entropy(logits[0], x[0, 1:])))
    if not losses:
        return math.nan
    return float(torch.tensor(losses).quantile(q))
