"""Our decoder loads Hugging Face checkpoints and reproduces their logits (fp32, < 1e-4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.config import ModelArgs

transformers = pytest.importorskip("transformers")

TOL = 1e-4
SMALL = dict(
    vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
)


def _hf_llama(**kw: object) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(**(SMALL | kw))
    return transformers.LlamaForCausalLM(cfg)


def _hf_qwen2(**kw: object) -> torch.nn.Module:
    cfg = transformers.Qwen2Config(**(SMALL | kw))
    return transformers.Qwen2ForCausalLM(cfg)


CASES = {
    "llama": lambda: _hf_llama(),
    "llama-tied-llama3-rope": lambda: _hf_llama(
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
        },
    ),
    "llama-linear-rope-mha": lambda: _hf_llama(
        num_key_value_heads=4, rope_scaling={"rope_type": "linear", "factor": 2.0}
    ),
    "qwen2": lambda: _hf_qwen2(rope_theta=1_000_000.0),
    "qwen2-tied": lambda: _hf_qwen2(tie_word_embeddings=True),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def hf_pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    hf = CASES[request.param]().eval()
    # Random init leaves biases at zero; perturb every parameter so q/k/v bias is exercised.
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    ours = load_checkpoint(path, dtype="float32")
    return hf, ours


def _tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, SMALL["vocab_size"], (batch, length), generator=g)


@torch.no_grad()
def test_full_forward_matches(hf_pair) -> None:
    hf, ours = hf_pair
    tokens = _tokens(2, 40)
    expected = hf(tokens).logits
    got = ours(tokens)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < TOL


@torch.no_grad()
def test_cached_decoding_matches(hf_pair) -> None:
    """Prefill 24 tokens, then decode 16 one at a time through the static cache."""
    hf, ours = hf_pair
    tokens = _tokens(2, 40, seed=2)
    expected = hf(tokens).logits
    cache = ours.new_cache(n_slots=2, max_len=64)
    prefill = ours(tokens[:, :24], torch.arange(24).expand(2, 24), cache)
    assert (prefill - expected[:, :24]).abs().max().item() < TOL
    for t in range(24, 40):
        pos = torch.full((2, 1), t)
        step = ours(tokens[:, t : t + 1], pos, cache)
        assert (step[:, 0] - expected[:, t]).abs().max().item() < TOL, f"position {t}"


@torch.no_grad()
def test_slots_and_ragged_positions(hf_pair) -> None:
    """Rows at different positions in other cache slots, as continuous batching runs them."""
    hf, ours = hf_pair
    a, b = _tokens(1, 30, seed=3), _tokens(1, 12, seed=4)
    cache = ours.new_cache(n_slots=4, max_len=64)
    # Garbage in the slots first: stale entries beyond a row's position must be masked.
    cache.k.normal_()
    cache.v.normal_()
    slots = torch.tensor([3, 1])
    ours(a[:, :29], torch.arange(29)[None], cache, slots[:1])
    ours(b[:, :11], torch.arange(11)[None], cache, slots[1:])
    step = ours(
        torch.cat([a[:, 29:], b[:, 11:]]), torch.tensor([[29], [11]]), cache, slots, kv_len=30
    )
    assert (step[0, 0] - hf(a).logits[0, -1]).abs().max().item() < TOL
    assert (step[1, 0] - hf(b).logits[0, -1]).abs().max().item() < TOL


def test_save_roundtrip_and_hf_reload(hf_pair, tmp_path: Path) -> None:
    _, ours = hf_pair
    out = save_checkpoint(ours, tmp_path / "ckpt", metadata={"name": "unit"})
    again = load_checkpoint(out)
    tokens = _tokens(1, 16, seed=5)
    with torch.no_grad():
        assert torch.equal(again(tokens), ours(tokens))
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        assert (reloaded(tokens).logits - ours(tokens)).abs().max().item() < TOL
    assert ModelArgs.from_file(out / "config.json") == ours.args


def test_logit_index_returns_one_position(hf_pair) -> None:
    _, ours = hf_pair
    tokens = _tokens(2, 10, seed=6)
    with torch.no_grad():
        full = ours(tokens)
        picked = ours(tokens, logit_index=torch.tensor([9, 4]))
    assert torch.allclose(picked, torch.stack([full[0, 9], full[1, 4]]), atol=1e-5)


def test_missing_weights_are_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_checkpoint(tmp_path / "nope")
