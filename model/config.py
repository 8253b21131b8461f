"""Model arguments of the Llama-family decoder, and their Hugging Face ``config.json`` form.

One frozen dataclass describes every architecture Tandem serves (Llama 2/3, Qwen2/2.5, Mistral,
DeepSeek-R1-Distill): they differ only in a few switches (q/k/v bias, tied embeddings, rope
scaling, Mistral's sliding window). Named presets follow gpt-fast's ``ModelArgs.from_name``.

``from_hf_config`` reads what transformers would build from the same ``config.json``, defaults
included; a key that would change the computation in a way our decoder does not implement
(another activation, MLP or output-projection bias, yarn rope, per-layer sliding windows,
quantized weights) is refused with a ValueError that names it, never ignored.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

# Architectures whose checkpoints load into our decoder; the value is the HF class name.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}
# transformers' defaults for keys a config.json may leave out (LlamaConfig, Qwen2Config,
# MistralConfig): a missing key means what it means to transformers.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048},
    "qwen2": {"max_position_embeddings": 32768, "max_window_layers": 28},
    "mistral": {"max_position_embeddings": 131072, "num_key_value_heads": 8,
                "sliding_window": 4096},
}
# Rotary scaling types and the keys each needs (transformers raises without them too).
_ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass(frozen=True)
class RopeScaling:
    """Rotary-embedding frequency scaling: "linear" (position interpolation) or "llama3"."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_type": self.rope_type, "factor": self.factor}
        if self.rope_type == "llama3":
            out |= {
                "low_freq_factor": self.low_freq_factor,
                "high_freq_factor": self.high_freq_factor,
                "original_max_position_embeddings": self.original_max_position_embeddings,
            }
        return out


@dataclass(frozen=True)
class ModelArgs:
    """Shape and switches of a decoder; checkpoints store them as an HF config.json."""

    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    intermediate_size: int = 11008
    head_dim: int = 0  # 0 means dim // n_heads
    max_seq_len: int = 4096
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    # Mistral: a query at position p attends to keys p - sliding_window + 1 .. p; None: all.
    sliding_window: int | None = None
    architecture: str = "llama"
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture must be one of {sorted(ARCHITECTURES)}, got {self.architecture!r}"
            )
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads {self.n_heads} must be a multiple of n_kv_heads {self.n_kv_heads}"
            )
        if self.sliding_window is not None:
            if self.architecture != "mistral":
                raise ValueError(f"sliding_window is a mistral setting; architecture "
                                 f"{self.architecture!r} has none")
            if self.sliding_window < 1:
                raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")

    @property
    def num_parameters(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        attn = self.dim * self.head_dim * (self.n_heads * 2 + self.n_kv_heads * 2)
        if self.qkv_bias:
            attn += self.head_dim * (self.n_heads + 2 * self.n_kv_heads)
        layer = attn + 3 * self.dim * self.intermediate_size + 2 * self.dim
        embed = self.vocab_size * self.dim * (1 if self.tie_word_embeddings else 2)
        return self.n_layers * layer + embed + self.dim

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelArgs:
        """A named preset (see ``PRESETS``), optionally with some fields replaced."""
        try:
            preset = PRESETS[name]
        except KeyError:
            raise ValueError(
                f"unknown model preset {name!r}; choose from {sorted(PRESETS)}"
            ) from None
        return replace(preset, **overrides)

    # ---- Hugging Face config.json ---------------------------------------------------------

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelArgs:
        """Build from a Hugging Face ``config.json`` dict (transformers 4.x or 5.x layout)."""
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size")
        if missing := [k for k in required if k not in cfg]:
            raise ValueError(f"config.json lacks {', '.join(missing)}")
        model_type = cfg.get("model_type", "llama")
        if model_type not in ARCHITECTURES:
            raise ValueError(
                f"model_type {model_type!r} is not supported; supported: {sorted(ARCHITECTURES)}"
            )
        cfg = _HF_DEFAULTS[model_type] | cfg
        _refuse_unsupported(cfg)
        theta, scaling = _rope(cfg)
        n_heads = int(cfg["num_attention_heads"])
        n_layers = int(cfg["num_hidden_layers"])
        dim = int(cfg["hidden_size"])
        eos = cfg.get("eos_token_id")
        if isinstance(eos, list):  # Llama 3 lists several; the first is the end of a turn
            eos = eos[0]
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            intermediate_size=int(cfg["intermediate_size"]),
            head_dim=int(cfg.get("head_dim") or dim // n_heads),
            max_seq_len=int(cfg["max_position_embeddings"]),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            qkv_bias=model_type == "qwen2",  # Qwen2 always has q/k/v bias, and only it
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            sliding_window=_sliding_window(cfg, model_type, n_layers),
            architecture=model_type,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos,
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` dict that ``from_hf_config`` reads back."""
        if self.architecture == "qwen2" and not self.qkv_bias:
            raise ValueError("a qwen2 checkpoint always has q/k/v bias; use architecture 'llama'")
        if self.architecture != "qwen2" and self.qkv_bias:
            # HF's attention_bias also puts a bias on o_proj, which our decoder does not have.
            raise ValueError("q/k/v bias without an o_proj bias is a qwen2 checkpoint; "
                             "use architecture 'qwen2'")
        cfg: dict[str, Any] = {
            "architectures": [ARCHITECTURES[self.architecture]],
            "model_type": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "intermediate_size": self.intermediate_size,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_hf() if self.rope_scaling else None,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": self.torch_dtype,
            "use_cache": True,
        }
        if self.architecture == "llama":
            cfg["attention_bias"] = False
            cfg["mlp_bias"] = False
        elif self.architecture == "mistral":
            # Written even when None: transformers' MistralConfig defaults to a 4096 window.
            cfg["sliding_window"] = self.sliding_window
        else:
            cfg["use_sliding_window"] = False
        return cfg

    @classmethod
    def from_file(cls, path: Path) -> ModelArgs:
        return cls.from_hf_config(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _refuse_unsupported(cfg: dict[str, Any]) -> None:
    """Raise ValueError naming the first key whose setting our decoder would compute wrongly."""
    if (act := cfg.get("hidden_act", "silu")) not in ("silu", "swish"):
        raise ValueError(f"hidden_act {act!r} is not supported (only 'silu')")
    if cfg.get("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported (the MLP projections have no bias)")
    if cfg.get("attention_bias"):
        raise ValueError("attention_bias=true (bias on q/k/v and o_proj) is not supported; "
                         "only Qwen2's q/k/v bias is")
    if float(cfg.get("partial_rotary_factor") or 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor {cfg['partial_rotary_factor']} is not "
                         "supported (rotary embedding over the whole head only)")
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "?")
        raise ValueError(f"quantization_config ({method}) is not supported; load the "
                         "unquantized checkpoint")


def _rope(cfg: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """rope_theta and the scaling of a config, from either transformers layout."""
    # transformers 5 nests rope settings in "rope_parameters"; 4.x uses top-level keys.
    # Typed keys: with dict[Any, Any] the outer get() picks its default=None overload.
    key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    rope: dict[str, Any] = dict(cfg.get(key) or {})
    theta = float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in _ROPE_KEYS:
        raise ValueError(f"{key} rope_type {rope_type!r} is not supported; supported: "
                         f"{', '.join(_ROPE_KEYS)}")
    if missing := [k for k in _ROPE_KEYS[rope_type] if k not in rope]:
        raise ValueError(f"{key} of rope_type {rope_type!r} lacks {', '.join(missing)}")
    if rope_type == "default":
        return theta, None
    return theta, RopeScaling(
        rope_type=rope_type,
        factor=float(rope["factor"]),
        low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
    )


def _sliding_window(cfg: dict[str, Any], model_type: str, n_layers: int) -> int | None:
    """Mistral's window (every layer), or None; Qwen2's per-layer windows are refused."""
    if model_type == "mistral":
        window = cfg.get("sliding_window")
        return None if window is None else int(window)
    if model_type == "qwen2":
        # Windows only with use_sliding_window, on layers from max_window_layers on, or as
        # layer_types lists them (transformers' Qwen2Config); no released Qwen2/2.5 or
        # DeepSeek-R1-Distill-Qwen checkpoint turns them on. Llama has no windows at all.
        layer_types: list[str] = list(cfg.get("layer_types") or [])
        sliding = any(t != "full_attention" for t in layer_types)
        if (not layer_types and cfg.get("use_sliding_window")
                and cfg.get("sliding_window", 4096) is not None
                and int(cfg["max_window_layers"]) < n_layers):
            sliding = True
        if sliding:
            raise ValueError("use_sliding_window=true (sliding-window attention on layers "
                             "from max_window_layers on, see layer_types) is not supported")
    return None


PRESETS: dict[str, ModelArgs] = {
    # Test-size model: builds and runs in milliseconds.
    "micro": ModelArgs(
        vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128,
        max_seq_len=256, tie_word_embeddings=True,
    ),
    # The shipped demo pair (see model/demo.py): same tokenizer, the cloud model ~3x the edge.
    "demo-edge": ModelArgs(
        vocab_size=4096, dim=192, n_layers=4, n_heads=6, n_kv_heads=2, intermediate_size=512,
        max_seq_len=512, tie_word_embeddings=True, architecture="qwen2", qkv_bias=True,
    ),
    "demo-cloud": ModelArgs(
        vocab_size=4096, dim=320, n_layers=6, n_heads=10, n_kv_heads=2, intermediate_size=864,
        max_seq_len=512, tie_word_embeddings=True, architecture="qwen2", qkv_bias=True,
    ),
    # Shapes of public models, for benchmarks with random weights (no download).
    "deepseek-r1-distill-qwen-1.5b": ModelArgs(
        vocab_size=151936, dim=1536, n_layers=28, n_heads=12, n_kv_heads=2,
        intermediate_size=8960, max_seq_len=131072, norm_eps=1e-6, rope_theta=10000.0,
        qkv_bias=True, architecture="qwen2", bos_token_id=151646, eos_token_id=151643,
        torch_dtype="bfloat16",
    ),
    "qwen2.5-0.5b": ModelArgs(
        vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2,
        intermediate_size=4864, max_seq_len=32768, norm_eps=1e-6, rope_theta=1000000.0,
        qkv_bias=True, tie_word_embeddings=True, architecture="qwen2",
        bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16",
    ),
    # SmolLM2-135M-Instruct: 30 thin layers, so decode is bound by launches, not bytes.
    "smollm2-135m": ModelArgs(
        vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
        intermediate_size=1536, max_seq_len=8192, rope_theta=100000.0,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    ),
    "llama-3.2-1b": ModelArgs(
        vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
        intermediate_size=8192, max_seq_len=131072, rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192), tie_word_embeddings=True,
        bos_token_id=128000, eos_token_id=128001, torch_dtype="bfloat16",
    ),
    "llama-3.1-8b": ModelArgs(
        vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
        intermediate_size=14336, max_seq_len=131072, rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
        bos_token_id=128000, eos_token_id=128001, torch_dtype="bfloat16",
    ),
}
