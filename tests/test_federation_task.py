"""The federated task's parts, without Flower's processes: LoRA, the model package, what a
round exchanges, site data, the run config, the quality gate and the calibrated threshold."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from federation.config import FedRunConfig
from federation.lora import add_lora, load_lora_state, lora_state, merge_lora
from federation.publish import compare_sites, find_checkpoint, weighted_mean, write_calibration
from federation.runner import parse_override
from federation.sitedata import (
    ESCALATIONS_FILE,
    EscalationLog,
    append_escalation,
    read_site,
    write_site,
)
from federation.task import (
    FULL,
    LORA,
    Exchange,
    LocalTraining,
    build_model,
    exchanged_state,
    heldout_loss,
    package_entries,
    prompt_loss_quantile,
    tokenize_site,
    train_locally,
    unpack,
)
from model.checkpoint import checkpoint_version, load_checkpoint
from model.tokenizer import Tokenizer

TEXTS = [f"Return the {w} of the items in the container, or raise ValueError." * 3
         for w in ("sum", "count", "first", "last", "largest", "smallest", "mean", "median")]


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return write_site(tmp_path / "site", "docs", TEXTS[:6], TEXTS[6:])


def test_lora_starts_as_a_no_op_trains_only_adapters_and_merges_exactly(
        micro_checkpoint: Path) -> None:
    base = load_checkpoint(micro_checkpoint, dtype="float32")
    model = load_checkpoint(micro_checkpoint, dtype="float32")
    add_lora(model, rank=4, alpha=8.0, seed=3)
    x = torch.randint(0, base.args.vocab_size, (2, 16))
    assert torch.allclose(model(x), base(x), atol=1e-6)  # B = 0: nothing changes yet
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_a", ".lora_b")) for n in trainable)
    # Same seed, same adapters: every site starts from the server's initialisation.
    other = add_lora(load_checkpoint(micro_checkpoint, dtype="float32"), rank=4, alpha=8.0,
                     seed=3)
    for k, v in lora_state(model).items():
        assert torch.equal(v, lora_state(other)[k]), k
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".lora_b"):
                p.normal_(0, 0.02)
    adapted = model(x)
    merged = merge_lora(model)
    assert not lora_state(merged)
    assert torch.allclose(merged(x), adapted, atol=1e-5)
    with pytest.raises(ValueError, match="adapter names differ"):
        load_lora_state(other, {"nope": torch.zeros(1)})


@pytest.mark.parametrize("kind", [FULL, LORA])
def test_package_and_exchanged_state_rebuild_the_model(
        micro_checkpoint: Path, tmp_path: Path, kind: str) -> None:
    exchange = Exchange(kind, lora_rank=4)
    entries = package_entries(micro_checkpoint, exchange)
    assert entries["package/base-version"] == checkpoint_version(micro_checkpoint)
    assert ("package/weights.safetensors" in entries) == (kind == LORA)
    # A full-exchange run cached this version without base weights; a LoRA run adds them.
    unpack(package_entries(micro_checkpoint, Exchange(FULL)), tmp_path)
    package = unpack(entries, tmp_path)
    assert unpack(entries, tmp_path) == package
    assert (package / "weights.safetensors").is_file() == (kind == LORA)
    model = load_checkpoint(micro_checkpoint, dtype="float32")
    if kind == LORA:
        add_lora(model, 4, 16.0, 0)
    state = exchanged_state(model, exchange)
    # Tied embeddings travel once; LoRA sends a small fraction of the weights.
    assert "lm_head.weight" not in state
    full_bytes = sum(v.numel() * 4 for v in exchanged_state(
        load_checkpoint(micro_checkpoint, dtype="float32"), Exchange(FULL)).values())
    sent = sum(v.numel() * 4 for v in state.values())
    assert (sent < full_bytes / 3) if kind == LORA else sent == full_bytes
    rebuilt = build_model(package, exchange, state)
    x = torch.randint(0, model.args.vocab_size, (1, 12))
    assert torch.allclose(rebuilt(x), model(x), atol=1e-6)


def test_local_training_lowers_the_site_loss(micro_checkpoint: Path, site: Path) -> None:
    torch.manual_seed(0)
    tokenizer = Tokenizer.from_dir(micro_checkpoint)
    tokens = tokenize_site(read_site(site), tokenizer)
    model = load_checkpoint(micro_checkpoint, dtype="float32")
    before, n = heldout_loss(model, tokens.train, 32)
    train_locally(model, tokens.train, LocalTraining(steps=30, batch_size=4, seq_len=32,
                                                      lr=3e-3))
    after, _ = heldout_loss(model, tokens.train, 32)
    assert n > 0 and after < before
    q = prompt_loss_quantile(model, tokenizer, tuple(TEXTS), 0.9)
    assert math.isfinite(q) and q > 0


def test_site_data_and_the_escalation_log(site: Path, tmp_path: Path) -> None:
    data = read_site(site)
    assert (data.name, len(data.train), len(data.heldout), data.escalations) == (
        "docs", 6, 2, ())
    append_escalation(site, "What is zq?", " A hard question.", node="n1")
    with open(site / ESCALATIONS_FILE, "a") as f:
        f.write('{"prompt": "cut mid-line')  # a crash mid-append loses that line only
    log = EscalationLog(tmp_path / "sites")
    log("Explain x", "edge says", " cloud says", "edge-7")
    assert read_site(tmp_path / "sites" / "edge-7").escalations[0].text == \
        "Explain x cloud says"
    data = read_site(site)
    assert [e.prompt for e in data.escalations] == ["What is zq?"]
    # Escalations count in training, repeated: they are few and they are the hard ones.
    tokenizer = Tokenizer.from_dir(Path(__file__).parents[1] / "model" / "demo_pair" / "edge")
    once = tokenize_site(data, tokenizer, escalation_repeat=1).train.numel()
    assert tokenize_site(data, tokenizer, escalation_repeat=5).train.numel() > once
    with pytest.raises(FileNotFoundError, match="tandem fed site"):
        read_site(tmp_path / "empty")


def test_run_config_reads_flower_values_and_refuses_typos(tmp_path: Path) -> None:
    base = {"base-checkpoint": str(tmp_path), "out-dir": str(tmp_path)}
    cfg = FedRunConfig.from_run_config({**base, "num-server-rounds": 2, "exchange": "lora",
                                        "dp-noise-multiplier": 0.5, "strategy": "fedprox"})
    assert (cfg.rounds, cfg.exchange.kind, cfg.dp, cfg.strategy) == (2, "lora", True,
                                                                      "fedprox")
    assert cfg.round_config("v1")["base-version"] == "v1"
    with pytest.raises(ValueError, match="unknown run config keys"):
        FedRunConfig.from_run_config({**base, "rounds": 2})
    with pytest.raises(ValueError, match="absolute path"):
        FedRunConfig.from_run_config({"out-dir": str(tmp_path), "base-checkpoint": "rel"})
    with pytest.raises(ValueError, match="SecAgg"):
        FedRunConfig.from_run_config({**base, "secagg": True, "min-nodes": 2})
    with pytest.raises(ValueError, match="exchange must be"):
        FedRunConfig.from_run_config({**base, "exchange": "deltas"})
    assert parse_override("lr=0.001") == ("lr", 0.001)
    assert parse_override("exchange=lora") == ("exchange", "lora")
    assert parse_override("secagg=true") == ("secagg", True)
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_override("lr")


def test_quality_gate_needs_every_site_better() -> None:
    start = {"a": 40.0, "b": 30.0, "c": 50.0}
    assert compare_sites(start, {"a": 39.0, "b": 29.0, "c": 49.0}, 3).better
    worse = compare_sites(start, {"a": 39.0, "b": 31.0, "c": 49.0}, 3)
    assert not worse.better and "not better on b" in worse.reason
    assert not compare_sites(start, {"a": 39.0}, 2).better  # too few sites measured twice
    assert weighted_mean({"a": 4.0, "b": 2.0}, {"a": 3, "b": 1}) == pytest.approx(3.5)


def test_checkpoints_are_found_by_version_and_carry_calibration(
        micro_checkpoint: Path, tmp_path: Path) -> None:
    version = checkpoint_version(micro_checkpoint)
    assert find_checkpoint(tmp_path, version, [micro_checkpoint]) == micro_checkpoint
    assert find_checkpoint(tmp_path, "other", [micro_checkpoint]) is None
    copy = tmp_path / "ck"
    copy.mkdir()
    write_calibration(copy, 4.25, 0.9, {"a": 4.0, "b": 4.5})
    assert json.loads((copy / "calibration.json").read_text())["difficulty_threshold"] == 4.25
