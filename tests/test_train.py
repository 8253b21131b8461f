"""The training loop learns, is deterministic, and FedProx holds weights near their start."""

from __future__ import annotations

import math

import pytest
import torch

from model.config import ModelArgs
from model.train import TrainConfig, evaluate_nll, init_weights, pack_documents, train
from model.transformer import Transformer


def _stream() -> torch.Tensor:
    # Documents with structure a tiny model can learn: counting runs in the vocabulary.
    gen = torch.Generator().manual_seed(0)
    docs = []
    for _ in range(200):
        start = int(torch.randint(3, 400, (1,), generator=gen))
        docs.append(list(range(start, start + 20)))
    return pack_documents(docs, bos_id=1, eos_id=2)


def _model(seed: int = 0) -> Transformer:
    model = Transformer(ModelArgs.from_name("micro"))
    init_weights(model, seed)
    return model


def test_pack_documents_frames_each_document() -> None:
    assert pack_documents([[7, 8], [9]], 1, 2).tolist() == [1, 7, 8, 2, 1, 9, 2]


def test_loss_falls_and_runs_are_deterministic() -> None:
    data = _stream()
    cfg = TrainConfig(steps=60, batch_size=16, seq_len=32, lr=1e-2, warmup_steps=5, log_every=0)
    a, b = _model(), _model()
    before = evaluate_nll(a, data, seq_len=32)
    ra, rb = train(a, data, cfg), train(b, data, cfg)
    after = evaluate_nll(a, data, seq_len=32)
    assert ra.losses == rb.losses
    assert before > math.log(512) - 0.5  # an untrained model is near uniform
    assert after < before - 2.0, (before, after)
    assert ra.tokens_seen == 60 * 16 * 32


def test_fedprox_keeps_weights_closer_to_the_start() -> None:
    data = _stream()
    drift = {}
    for mu in (0.0, 1.0):
        model = _model()
        start = [p.detach().clone() for p in model.parameters()]
        train(model, data, TrainConfig(steps=30, batch_size=8, seq_len=32, prox_mu=mu, log_every=0))
        pairs = zip(model.parameters(), start, strict=True)
        drift[mu] = sum(float((p.detach() - s).pow(2).sum()) for p, s in pairs)
    assert drift[1.0] < drift[0.0]


def test_bad_config_and_short_data_are_refused() -> None:
    with pytest.raises(ValueError, match="steps must be >= 1"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="tokens to train"):
        train(_model(), torch.arange(10), TrainConfig(seq_len=32))
