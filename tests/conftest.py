"""Session fixtures: micro models built on our own stack, and their edge artifacts.

A byte-level BPE (model/tokenizer.py) trained on the demo corpus's train split, the "micro"
preset of our Transformer trained briefly with model/train.py so that greedy decoding has clear
winners and perplexity means something, saved with model/checkpoint.py and exported with
model/export.py; and the shipped demo edge model exported as int4, which the edge, control and
discovery tests serve. Each is built once per session, on first use.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from model.checkpoint import checkpoint_version, save_checkpoint
from model.config import ModelArgs
from model.corpus import load_corpus
from model.demo import DEMO_DIR
from model.export import export_edge_artifact
from model.manifest import Manifest, read_manifest, verify_artifact, write_manifest
from model.tokenizer import Tokenizer, train_bpe_tokenizer
from model.train import TrainConfig, init_weights, pack_documents, train
from model.transformer import Transformer

MICRO_VOCAB = 512
MICRO_BASE_VERSION = "micro-1"
# The Llama micro model gets every quantization; the Qwen2 one checks the q/k/v bias path.
MICRO_ARTIFACTS = (("llama", "fp32"), ("llama", "int8"), ("llama", "int4"), ("qwen2", "fp32"))


@dataclass(frozen=True)
class MicroData:
    """The micro tokenizer (also saved in ``tokenizer_dir``) and packed token streams."""

    tokenizer: Tokenizer
    tokenizer_dir: Path
    train: torch.Tensor
    heldout: torch.Tensor


@dataclass(frozen=True)
class MicroArtifacts:
    """Edge artifacts of the micro checkpoints under ``root``, named ``{arch}-{quantization}``."""

    root: Path
    base_version: str
    checkpoints: dict[str, Path]
    manifests: dict[tuple[str, str], Manifest]

    def path(self, arch: str, quantization: str) -> Path:
        return self.root / f"{arch}-{quantization}"


@pytest.fixture(scope="session")
def micro_data(tmp_path_factory: pytest.TempPathFactory) -> MicroData:
    """A 512-token BPE trained on the corpus's train split, and both splits packed."""
    corpus = load_corpus()
    texts = corpus.texts(split="train")
    tokenizer = train_bpe_tokenizer(texts, vocab_size=MICRO_VOCAB)
    tokenizer_dir = tokenizer.save(tmp_path_factory.mktemp("micro-tokenizer"))

    def packed(docs: list[str]) -> torch.Tensor:
        ids = tokenizer.encode_batch(docs, add_bos=False)
        return pack_documents(ids, tokenizer.bos_id, tokenizer.eos_id)

    return MicroData(tokenizer, tokenizer_dir, packed(texts), packed(corpus.texts(split="heldout")))


def _train_micro(data: MicroData, out: Path, steps: int, seed: int, **overrides: object) -> Path:
    """Train a micro-preset model for ``steps`` small batches and save it as fp32."""
    tok = data.tokenizer
    args = ModelArgs.from_name(
        "micro",
        vocab_size=tok.vocab_size,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        **overrides,
    )
    torch.manual_seed(seed)
    model = Transformer(args)
    init_weights(model, seed)
    if args.qkv_bias:
        # init_weights zeroes biases and a short run barely moves them: make them matter.
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.2, generator=gen)
    cfg = TrainConfig(
        steps=steps, batch_size=16, seq_len=64, lr=3e-3, warmup_steps=20, seed=seed, log_every=0
    )
    train(model, data.train, cfg)
    return save_checkpoint(
        model, out, tokenizer_dir=data.tokenizer_dir, metadata={"name": out.name}
    )


@pytest.fixture(scope="session")
def micro_checkpoint(micro_data: MicroData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama micro checkpoint (tied embeddings, as the preset), ~6 s of training."""
    return _train_micro(micro_data, tmp_path_factory.mktemp("micro") / "llama", 300, seed=0)


@pytest.fixture(scope="session")
def micro_qwen2_checkpoint(micro_data: MicroData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Qwen2 micro checkpoint: q/k/v bias, and untied embeddings to cover that path too."""
    out = tmp_path_factory.mktemp("micro") / "qwen2"
    return _train_micro(
        micro_data, out, 100, seed=1, architecture="qwen2", qkv_bias=True, tie_word_embeddings=False
    )


@pytest.fixture(scope="session")
def micro_artifacts(
    micro_checkpoint: Path,
    micro_qwen2_checkpoint: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> MicroArtifacts:
    """Every artifact of ``MICRO_ARTIFACTS``, exported once."""
    checkpoints = {"llama": micro_checkpoint, "qwen2": micro_qwen2_checkpoint}
    root = tmp_path_factory.mktemp("edge") / "artifacts"
    # A stale artifact where llama-int8 goes: export must replace it whole (tested).
    (root / "llama-int8").mkdir(parents=True)
    (root / "llama-int8" / "stale.bin").write_bytes(b"old")
    # Each export is a builder subprocess: two at a time use both cores.
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {
            (arch, q): pool.submit(
                export_edge_artifact, checkpoints[arch], root / f"{arch}-{q}", q, MICRO_BASE_VERSION
            )
            for arch, q in MICRO_ARTIFACTS
        }
        manifests = {key: f.result() for key, f in futures.items()}
    return MicroArtifacts(root, MICRO_BASE_VERSION, checkpoints, manifests)


@pytest.fixture(scope="session")
def demo_edge_int4(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The shipped demo edge model exported as int4 (~8 s), shared by every module: read only.

    A test that changes files works on ``demo_edge_int4_copy``; teardown fails if one did not.
    """
    checkpoint = DEMO_DIR / "edge"
    out = tmp_path_factory.mktemp("demo-edge") / "demo-edge-int4"
    manifest = export_edge_artifact(checkpoint, out, "int4", checkpoint_version(checkpoint))
    yield out
    assert read_manifest(out) == manifest, f"a test rewrote {out}/manifest.json: copy it first"
    verify_artifact(out, manifest)  # raises naming the files a test changed, added or removed


@pytest.fixture(scope="session")
def demo_edge_int4_copy(demo_edge_int4: Path) -> Callable[[Path, str | None], Path]:
    """``copy(dest, model_version)``: a private copy of ``demo_edge_int4`` at ``dest``.

    With a ``model_version`` the copy is that version (only manifest.json differs), as if
    exported with ``export_edge_artifact(..., model_version=...)``.
    """
    manifest = read_manifest(demo_edge_int4)

    def copy(dest: Path, model_version: str | None = None) -> Path:
        shutil.copytree(demo_edge_int4, dest)
        if model_version is not None:
            write_manifest(dest, dataclasses.replace(manifest, model_version=model_version))
        return dest

    return copy


class Clock:
    """Wall-clock stand-in the tests move by hand."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()
