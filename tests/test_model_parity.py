"""Our decoder loads Hugging Face checkpoints of every family Tandem serves and reproduces them.

Per family a tiny random-weight model is built with transformers from the family's own config
keys, saved with ``save_pretrained`` (safetensors) and loaded with ``load_checkpoint``. Its fp32
logits match transformers' within 1e-4 (whole sequence, prefill into the static cache, cached
decode steps in shared slots), and greedy decoding through the cloud engine's own loop
(scheduler, chunked prefill, decode steps over a fused model) picks transformers' tokens.
Config keys our decoder does not implement are refused by name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from safetensors.torch import save_file

from cloud.batch_step import BatchStepper, DecodeConfig
from cloud.batcher import ContinuousBatcher, TokenSequence
from cloud.scheduler import Scheduler, SchedulerConfig
from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.config import PRESETS, ModelArgs, RopeScaling
from model.transformer import Transformer

transformers = pytest.importorskip("transformers")

TOL = 1e-4
SMALL: dict[str, Any] = dict(
    vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
)
# Shorter than the sequences below (40 tokens, 37 in greedy decoding), so the window masks.
WINDOW = 16
LLAMA31_ROPE = {  # Llama 3.1's, as DeepSeek-R1-Distill-Llama-8B ships it
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# name -> (transformers config class, the family's distinctive keys).
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    # Llama 3.2-like: grouped-query attention, rope_theta 5e5, rms_norm_eps 1e-5.
    "llama": ("LlamaConfig", dict(rope_theta=500_000.0, rms_norm_eps=1e-5)),
    # Llama 3.2 1B/3B: tied embeddings and llama3 rope scaling (a short original context, so
    # that every frequency band is rescaled at rope_theta 1e4).
    "llama-tied-llama3-rope": ("LlamaConfig", dict(
        tie_word_embeddings=True,
        rope_scaling=LLAMA31_ROPE | {"original_max_position_embeddings": 16},
    )),
    "llama-linear-rope-mha": ("LlamaConfig", dict(
        num_key_value_heads=4, rope_scaling={"rope_type": "linear", "factor": 2.0},
    )),
    # Qwen2 0.5B/1.5B: q/k/v bias (every Qwen2 has it) and tied embeddings.
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, rope_theta=1_000_000.0)),
    # Qwen2.5 7B-like: bias, untied, three query heads per kv head, the window switched off.
    "qwen2.5": ("Qwen2Config", dict(
        hidden_size=96, num_attention_heads=6, num_key_value_heads=2, rope_theta=1_000_000.0,
        rms_norm_eps=1e-6, use_sliding_window=False, sliding_window=131072, max_window_layers=28,
    )),
    # Mistral v0.2+ and Nemo: no window, and a head_dim that is not hidden_size / heads.
    "mistral": ("MistralConfig", dict(sliding_window=None, head_dim=24, rope_theta=1_000_000.0)),
    # Mistral 7B v0.1: a sliding window (4096 there).
    "mistral-sliding-window": ("MistralConfig", dict(sliding_window=WINDOW)),
    # DeepSeek-R1-Distill-Qwen 1.5B/7B: Qwen2 at rope_theta 1e4, untied, BOS == EOS, a window
    # configured but not used.
    "deepseek-r1-distill-qwen": ("Qwen2Config", dict(
        rope_theta=10_000.0, rms_norm_eps=1e-6, bos_token_id=3, eos_token_id=3,
        use_sliding_window=False, sliding_window=4096, max_window_layers=21,
    )),
    # DeepSeek-R1-Distill-Llama-8B: Llama 3.1 (at head_dim 16 and rope_theta 5e5 its llama3
    # scaling keeps 4 frequencies, rescales 3 and interpolates 1).
    "deepseek-r1-distill-llama": ("LlamaConfig", dict(
        rope_theta=500_000.0, rms_norm_eps=1e-5, bos_token_id=4, eos_token_id=[5, 6],
        rope_scaling=LLAMA31_ROPE, max_position_embeddings=131072,
    )),
}


class Pair(NamedTuple):
    hf: torch.nn.Module
    ours: Transformer
    path: Path  # the save_pretrained directory


def _save_hf(family: str, path: Path) -> torch.nn.Module:
    """The family's tiny transformers model, saved to ``path`` (safetensors)."""
    config_class, keys = FAMILIES[family]
    torch.manual_seed(0)
    cfg = getattr(transformers, config_class)(**(SMALL | keys))
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    # Random init leaves biases at zero; perturb every parameter so q/k/v bias is exercised.
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf.save_pretrained(path)
    return hf


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def hf_pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pair:
    path = tmp_path_factory.mktemp(request.param)
    hf = _save_hf(request.param, path)
    return Pair(hf, load_checkpoint(path, dtype="float32"), path)


def _tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, SMALL["vocab_size"], (batch, length), generator=g)


@torch.no_grad()
def test_full_forward_matches(hf_pair: Pair) -> None:
    hf, ours, _ = hf_pair
    tokens = _tokens(2, 40)
    expected = hf(tokens).logits
    got = ours(tokens)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < TOL


@torch.no_grad()
def test_cached_decoding_matches(hf_pair: Pair) -> None:
    """Prefill 24 tokens, then decode 16 one at a time through the static cache."""
    hf, ours, _ = hf_pair
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
def test_slots_and_ragged_positions(hf_pair: Pair) -> None:
    """Rows at different positions in other cache slots, as continuous batching runs them."""
    hf, ours, _ = hf_pair
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


@torch.no_grad()
def _hf_greedy(hf: torch.nn.Module, prompt: Sequence[int], n: int) -> tuple[list[int], float]:
    """transformers' greedy continuation (a full forward per token), and its smallest gap
    between the best and second-best logit: how far from a tie every choice was."""
    ids, gap = list(prompt), math.inf
    for _ in range(n):
        logits = hf(torch.tensor([ids])).logits[0, -1]
        best = logits.topk(2).values
        gap = min(gap, float(best[0] - best[1]))
        ids.append(int(logits.argmax()))
    return ids[len(prompt) :], gap


def _engine_greedy(path: Path, prompts: Sequence[Sequence[int]], n: int) -> list[list[int]]:
    """Greedy decoding as the cloud engine runs it: fused projections, one slot per sequence,
    admission and chunked prefill by the scheduler's budget, batched decode steps."""
    model = load_checkpoint(path, dtype="float32")
    model.fuse_projections()
    cache = model.new_cache(n_slots=len(prompts), max_len=64)
    # An 8-token budget: the second prompt is admitted a step late and prefilled in two
    # chunks next to the first one's decode steps.
    scheduler: Scheduler[TokenSequence] = Scheduler(
        SchedulerConfig(slots=len(prompts), max_queue=len(prompts), max_prefill_tokens=8),
        cost=lambda s: len(s.prompt_ids),
    )
    batcher = ContinuousBatcher(BatchStepper(model, cache, DecodeConfig()), scheduler,
                                lambda seq, token, now: len(seq.generated) == n)
    seqs = [TokenSequence(prompt_ids=list(p)) for p in prompts]
    for seq in seqs:
        scheduler.submit(seq)
    for _ in range(4 * n):
        if all(seq.done for seq in seqs):
            break
        batcher.step()
    return [seq.generated for seq in seqs]


def test_greedy_decoding_matches_token_for_token(hf_pair: Pair) -> None:
    hf, _, path = hf_pair
    prompts = [_tokens(1, 7, seed=7)[0].tolist(), _tokens(1, 13, seed=8)[0].tolist()]
    got = _engine_greedy(path, prompts, 24)
    for prompt, tokens in zip(prompts, got, strict=True):
        want, gap = _hf_greedy(hf, prompt, 24)
        assert tokens == want, f"smallest top-2 logit gap on transformers' path: {gap:.1e}"


def test_save_roundtrip_and_hf_reload(hf_pair: Pair, tmp_path: Path) -> None:
    _, ours, _ = hf_pair
    out = save_checkpoint(ours, tmp_path / "ckpt", metadata={"name": "unit"})
    again = load_checkpoint(out)
    tokens = _tokens(1, 40, seed=5)  # past the sliding window: transformers must apply it too
    with torch.no_grad():
        assert torch.equal(again(tokens), ours(tokens))
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        assert (reloaded(tokens).logits - ours(tokens)).abs().max().item() < TOL
    assert ModelArgs.from_file(out / "config.json") == ours.args


def test_transformers_4_layout_reads_the_same(hf_pair: Pair) -> None:
    """Hub configs written by transformers 4.x keep rope_theta and rope_scaling at the top."""
    cfg = json.loads((hf_pair.path / "config.json").read_text())
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = None if rope["rope_type"] == "default" else rope
    cfg.pop("layer_types", None)
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    assert ModelArgs.from_hf_config(cfg) == hf_pair.ours.args


def test_logit_index_returns_one_position(hf_pair: Pair) -> None:
    _, ours, _ = hf_pair
    tokens = _tokens(2, 10, seed=6)
    with torch.no_grad():
        full = ours(tokens)
        picked = ours(tokens, logit_index=torch.tensor([9, 4]))
    assert torch.allclose(picked, torch.stack([full[0, 9], full[1, 4]]), atol=1e-5)


# ---- config.json keys of released checkpoints, and what is refused ------------------------

def _shapes(args: ModelArgs) -> ModelArgs:
    return replace(args, bos_token_id=None, eos_token_id=None)


def test_released_configs_read_as_their_presets() -> None:
    """The keys of DeepSeek-R1-Distill-Qwen-1.5B's and -Llama-8B's config.json (4.x layout)."""
    qwen = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
        "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-06, "rope_theta": 10000,
        "rope_scaling": None, "sliding_window": 4096, "use_sliding_window": False,
        "max_window_layers": 21, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "bos_token_id": 151643, "eos_token_id": 151643, "use_mrope": False,
    }
    llama = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
        "rope_scaling": LLAMA31_ROPE, "attention_bias": False, "mlp_bias": False,
        "pretraining_tp": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "bos_token_id": 128000, "eos_token_id": 128001,
    }
    got = ModelArgs.from_hf_config(qwen)
    assert _shapes(got) == _shapes(PRESETS["deepseek-r1-distill-qwen-1.5b"])
    assert got.sliding_window is None
    got = ModelArgs.from_hf_config(llama)
    assert got == PRESETS["llama-3.1-8b"]


def test_mistral_window_and_missing_keys_mean_what_they_mean_to_transformers() -> None:
    base = {"model_type": "mistral", "vocab_size": 320, "hidden_size": 64,
            "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 8}
    v01 = ModelArgs.from_hf_config(base | {"sliding_window": 4096,
                                           "max_position_embeddings": 32768})
    assert (v01.sliding_window, v01.max_seq_len) == (4096, 32768)
    assert ModelArgs.from_hf_config(base | {"sliding_window": None}).sliding_window is None
    # MistralConfig's defaults: a 4096 window, 8 kv heads, 128k positions, eps 1e-6.
    bare = ModelArgs.from_hf_config(base)
    assert (bare.sliding_window, bare.n_kv_heads, bare.max_seq_len, bare.norm_eps) == (
        4096, 8, 131072, 1e-6)
    with pytest.raises(ValueError, match="sliding_window"):
        ModelArgs.from_name("micro", sliding_window=8)  # a llama has no window


REFUSED: dict[str, tuple[str, dict[str, Any], str]] = {
    "gelu": ("llama", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    "mlp-bias": ("llama", {"mlp_bias": True}, "mlp_bias"),
    "o-proj-bias": ("llama", {"attention_bias": True}, "attention_bias"),
    "yarn": ("qwen2", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                        "original_max_position_embeddings": 32768}},
             "rope_scaling rope_type 'yarn'"),
    "dynamic-v5": ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0,
                                                 "rope_theta": 10000.0}},
                   "rope_parameters rope_type 'dynamic'"),
    "llama3-incomplete": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
                          "lacks low_freq_factor, high_freq_factor, original_max"),
    "partial-rotary": ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    "quantized": ("mistral", {"quantization_config": {"quant_method": "awq"}},
                  r"quantization_config \(awq\)"),
    "qwen2-window": ("qwen2", {"use_sliding_window": True, "sliding_window": 16,
                               "max_window_layers": 1}, "use_sliding_window"),
    "qwen2-layer-types": ("qwen2", {"layer_types": ["full_attention", "sliding_attention"]},
                          "use_sliding_window"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_config_keys_are_refused_by_name(case: str, tmp_path: Path) -> None:
    model_type, keys, message = REFUSED[case]
    cfg = SMALL | {"model_type": model_type} | keys
    with pytest.raises(ValueError, match=message):
        ModelArgs.from_hf_config(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({"lm_head.weight": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path)


def test_weights_in_another_layout_beside_the_hf_ones_are_left_out(tmp_path: Path) -> None:
    """Mistral's repositories ship consolidated.safetensors next to the HF shards."""
    hf = _save_hf("mistral", tmp_path)
    save_file({"layers.0.attention.wq.weight": torch.zeros(1)},
              tmp_path / "consolidated.safetensors")
    tokens = _tokens(1, 8)
    with torch.no_grad():
        assert (load_checkpoint(tmp_path)(tokens) - hf(tokens).logits).abs().max().item() < TOL


def test_missing_weights_are_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_checkpoint(tmp_path / "nope")


# ---- GGUF: Llama 3.1's rope scaling lives in a tensor --------------------------------------

def _llama_cpp_rope_factors(args: ModelArgs) -> list[float]:
    """llama.cpp convert_hf_to_gguf.py's rope_freqs for llama3 scaling (its original context
    is always 8192, low/high_freq_factor default to 1 and 4)."""
    assert args.rope_scaling is not None
    factor, low, high, old = args.rope_scaling.factor, 1.0, 4.0, 8192
    out = []
    for i in range(0, args.head_dim, 2):
        wavelen = 2 * math.pi * args.rope_theta ** (i / args.head_dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def test_gguf_import_keeps_llama3_rope_scaling(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gguf")
    import gguf_files
    from tokenizers import Tokenizer, models

    from model.gguf_import import GGUFImportError, read_gguf, write_hf_directory

    args = ModelArgs(
        vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=160,
        max_seq_len=128, rope_theta=500_000.0, rope_scaling=RopeScaling("llama3", 8.0),
    )
    torch.manual_seed(0)
    source = Transformer(args).eval()
    vocab = {"a": 0, "b": 1, "ab": 2} | {f"t{i}": i for i in range(3, args.vocab_size)}
    Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")])).save(str(tmp_path / "tokenizer.json"))
    src = save_checkpoint(source, tmp_path / "src", tokenizer_dir=tmp_path)
    factors = _llama_cpp_rope_factors(args)

    class WithRopeFreqs(gguf_files.GGUFWriter):
        def write_header_to_file(self, *a: Any, **kw: Any) -> None:
            self.add_tensor("rope_freqs.weight", torch.tensor(factors).numpy())
            super().write_header_to_file(*a, **kw)

    monkeypatch.setattr(gguf_files, "GGUFWriter", WithRopeFreqs)
    gguf = gguf_files.write_gguf(src, tmp_path / "model.gguf")
    imported = load_checkpoint(write_hf_directory(read_gguf(gguf), tmp_path / "imported"))
    assert imported.args.rope_scaling == args.rope_scaling
    tokens = _tokens(1, 40)
    with torch.no_grad():
        assert (imported(tokens) - source(tokens)).abs().max().item() < 1e-5

    factors[2] *= 1.5  # not what Llama 3's formula gives
    gguf = gguf_files.write_gguf(src, tmp_path / "odd.gguf")
    with pytest.raises(GGUFImportError, match=r"rope_freqs\.weight"):
        read_gguf(gguf)
