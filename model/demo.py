"""The demo model pair: a BPE tokenizer, a larger "cloud" and a smaller "edge" model.

Built from the standard library's docstrings (model/corpus.py), so nothing is downloaded. Two
stages, because the text depends on the Python version that builds the corpus: ``prepare_data``
tokenizes the corpus here into a data directory (tokenizer + token streams per family and
split), and ``train_pair`` trains both models from that directory on any device (the shipped
pair was trained on a GPU; see README). ``evaluate_checkpoint`` measures held-out perplexity per
family, the number recorded in each checkpoint's ``tandem.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import ModelArgs
from model.corpus import SPLITS, Document, load_corpus
from model.tokenizer import Tokenizer, train_bpe_tokenizer
from model.train import TrainConfig, evaluate_nll, init_weights, pack_documents, train
from model.transformer import Transformer

log = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).resolve().parent / "demo_pair"
TOKENS_FILE = "tokens.npz"
EVAL_SEQ_LEN = 256
# Share of training documents set aside for early stopping (the held-out split stays unseen).
VALID_PERCENT = 5


@dataclass(frozen=True)
class DemoConfig:
    """How the demo pair is built; the defaults made the shipped pair."""

    vocab_size: int = 4096
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 64
    seq_len: int = 256
    edge_steps: int = 800
    cloud_steps: int = 800
    edge_lr: float = 3e-3
    cloud_lr: float = 2e-3
    eval_every: int = 100
    edge_preset: str = "demo-edge"
    cloud_preset: str = "demo-cloud"


@dataclass(frozen=True)
class DemoData:
    """A tokenizer plus packed token streams keyed ``"{split}/{family}"``."""

    tokenizer: Tokenizer
    streams: dict[str, torch.Tensor]
    python_version: str

    def stream(self, split: str, family: str | None = None) -> torch.Tensor:
        keys = sorted(k for k in self.streams if k.split("/")[0] == split)
        if family is not None:
            keys = [f"{split}/{family}"]
            if keys[0] not in self.streams:
                raise ValueError(f"no {split} data for family {family!r}; have {self.families}")
        return torch.cat([self.streams[k] for k in keys])

    @property
    def families(self) -> list[str]:
        return sorted({k.split("/", 1)[1] for k in self.streams})


def prepare_data(out_dir: Path, vocab_size: int = 4096) -> DemoData:
    """Build the corpus, train the tokenizer and tokenize every family and split."""
    corpus = load_corpus()
    tokenizer = train_bpe_tokenizer(corpus.texts(split="train"), vocab_size=vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out_dir)
    bos_id = tokenizer.bos_id
    assert bos_id is not None, "train_bpe_tokenizer always defines <bos>"
    streams: dict[str, np.ndarray] = {}
    for family in corpus.families:
        for split in SPLITS:
            docs = corpus.documents(family, split)
            parts: dict[str, list[Document]] = {split: docs}
            if split == "train":
                parts = {
                    "train": [d for d in docs if not _is_valid(d.name)],
                    "valid": [d for d in docs if _is_valid(d.name)],
                }
            for name, part in parts.items():
                ids = [tokenizer.encode(d.text, add_bos=False) for d in part]
                packed = pack_documents(ids, bos_id, tokenizer.eos_id)
                streams[f"{name}/{family}"] = packed.numpy().astype(np.int32)
    # mypy checks **streams against savez's allow_pickle: bool too; naming allow_pickle here
    # instead would save it as an array under the numpy 1.x that pyproject still allows.
    np.savez(out_dir / TOKENS_FILE, **streams)  # type: ignore[arg-type]
    (out_dir / "data.json").write_text(
        json.dumps({"python_version": platform.python_version(), "stats": corpus.stats()}, indent=2)
    )
    log.info("demo data in %s: %d train tokens", out_dir, sum(
        len(v) for k, v in streams.items() if k.startswith("train/")
    ))
    return load_data(out_dir)


def _is_valid(name: str) -> bool:
    digest = hashlib.sha256(f"valid:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < VALID_PERCENT


def load_data(data_dir: Path) -> DemoData:
    """Read what ``prepare_data`` wrote."""
    with np.load(data_dir / TOKENS_FILE) as npz:
        streams = {k: torch.from_numpy(npz[k].astype(np.int64)) for k in npz.files}
    info = json.loads((data_dir / "data.json").read_text())
    return DemoData(Tokenizer.from_dir(data_dir), streams, info["python_version"])


def evaluate_checkpoint(path: Path, data: DemoData, device: str = "cpu") -> dict[str, float]:
    """Held-out perplexity of a checkpoint, per family and overall (token-weighted), in fp32."""
    model = load_checkpoint(path, device=device, dtype="float32")
    result: dict[str, float] = {}
    total_nll, total_tokens = 0.0, 0
    for family in data.families:
        tokens = data.stream("heldout", family)
        nll = evaluate_nll(model, tokens, seq_len=EVAL_SEQ_LEN)
        n = (tokens.numel() - 1) // EVAL_SEQ_LEN * EVAL_SEQ_LEN
        result[family] = round(math.exp(nll), 3)
        total_nll += nll * n
        total_tokens += n
    result["all"] = round(math.exp(total_nll / total_tokens), 3)
    return result


def train_model(
    role: str, data: DemoData, data_dir: Path, out: Path, cfg: DemoConfig
) -> dict[str, Any]:
    """Train one member of the pair from scratch and save it as a bf16 checkpoint."""
    preset = cfg.edge_preset if role == "edge" else cfg.cloud_preset
    tok = data.tokenizer
    args = ModelArgs.from_name(
        preset, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id
    )
    torch.manual_seed(cfg.seed)
    model = Transformer(args)
    init_weights(model, cfg.seed)
    tcfg = TrainConfig(
        steps=cfg.edge_steps if role == "edge" else cfg.cloud_steps,
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        lr=cfg.edge_lr if role == "edge" else cfg.cloud_lr,
        warmup_steps=100,
        seed=cfg.seed,
        device=cfg.device,
        eval_every=cfg.eval_every,
    )
    log.info("training demo-%s (%s, %.2fM parameters) on %s for %d steps", role, preset,
             args.num_parameters / 1e6, cfg.device, tcfg.steps)
    result = train(model, data.stream("train"), tcfg, eval_tokens=data.stream("valid"))
    meta = {
        "name": f"demo-{role}",
        "role": role,
        "preset": preset,
        "parameters": args.num_parameters,
        "train": asdict(tcfg) | {"seconds": round(result.seconds, 1),
                                 "tokens_seen": result.tokens_seen,
                                 "final_loss": round(result.final_loss, 4),
                                 "best_step": result.best_step,
                                 "validation": [(s, round(v, 4)) for s, v in result.evals]},
        "demo_config": asdict(cfg),
        "corpus_python": data.python_version,
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name() if cfg.device.startswith("cuda") else "cpu",
    }
    path = save_checkpoint(model.cpu(), out, tokenizer_dir=data_dir, metadata=meta,
                           dtype="bfloat16")
    return meta | {"path": str(path)}


def record_perplexity(path: Path, data: DemoData) -> dict[str, float]:
    """Measure held-out perplexity of a saved checkpoint and store it in its tandem.json."""
    ppl = evaluate_checkpoint(path, data)
    meta_file = path / "tandem.json"
    meta = json.loads(meta_file.read_text())
    meta["heldout_perplexity"] = ppl
    meta_file.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return ppl


def train_pair(data_dir: Path, out_dir: Path, cfg: DemoConfig) -> dict[str, dict[str, float]]:
    """Train edge and cloud models from ``data_dir`` into ``out_dir/{edge,cloud}``."""
    data = load_data(data_dir)
    start = time.perf_counter()
    report = {}
    for role in ("edge", "cloud"):
        train_model(role, data, data_dir, out_dir / role, cfg)
        report[role] = record_perplexity(out_dir / role, data)
        log.info("demo-%s held-out perplexity %s", role, report[role])
    log.info("demo pair trained in %.0f s", time.perf_counter() - start)
    return report
