"""GGUF files (llama.cpp's format) to Hugging Face style checkpoint directories.

Reads a ``.gguf`` with the ``gguf`` library, dequantizes every tensor to float32, undoes the
q/k row permutation llama.cpp's converter applies for its rotary layout, and rebuilds the
byte-level BPE tokenizer (vocabulary, merges, special tokens, pre-tokenizer, chat template).
The result loads with :func:`model.checkpoint.load_checkpoint`, ``Tokenizer.from_dir`` and
transformers alike. Numpy and ``tokenizers`` only: no torch, no transformers, no llama.cpp.

Supported: Llama-architecture GGUFs (Llama, Mistral, SmolLM, DeepSeek-R1-Distill-Llama) and
Qwen2 (with q/k/v bias; DeepSeek-R1-Distill-Qwen) whose tokenizer is GPT-2 style BPE
(``tokenizer.ggml.model == "gpt2"``). SentencePiece GGUFs (Llama 2) are refused with a message
saying so. Rotary scaling comes back as the HF config's: linear from ``rope.scaling.*``, Llama 3
(3.1 and later) from the ``rope_freqs.weight`` tensor, the only place llama.cpp's converter
keeps it. A GGUF of Mistral is a "llama" one without its sliding window (llama.cpp writes
none), so Mistral 7B v0.1's 4096-token window is not applied to an imported one.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from model.config import ModelArgs, RopeScaling

log = logging.getLogger(__name__)

# GGUF architecture -> our config's model_type. Mistral GGUFs say "llama".
_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}

# llama.cpp's pre-tokenizer names (``tokenizer.ggml.pre``) and the split each one means.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level_after(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


_PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "default": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    # SmolLM splits every digit, then GPT-2's pattern (HF's tokenizer.json says the same).
    "smollm": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ]),
    "qwen2": lambda: _byte_level_after(_QWEN2_SPLIT),
    "deepseek-r1-qwen": lambda: _byte_level_after(_QWEN2_SPLIT),
    "llama-bpe": lambda: _byte_level_after(_LLAMA3_SPLIT),
}
_CONTROL = 3  # llama.cpp's token type for special (control) tokens
_USER_DEFINED = 4

# GGUF tensor names -> Hugging Face names ("{i}" is the layer index).
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")


class GGUFImportError(ValueError):
    """The file is not a GGUF Tandem can import; the message says what it holds instead."""


@dataclass(frozen=True)
class GGUFModel:
    """What a GGUF file holds, converted: HF config, float32 tensors, tokenizer files."""

    config: dict[str, Any]
    tensors: dict[str, np.ndarray]
    tokenizer: BackendTokenizer
    tokenizer_config: dict[str, Any]
    generation_config: dict[str, Any]
    name: str


def read_gguf(path: str | Path) -> GGUFModel:
    """Read and convert ``path``; raises GGUFImportError for what is not supported."""
    from gguf import GGUFReader  # imported here: only `tandem model import` needs it

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise GGUFImportError(f"{path} is not a readable GGUF file: {exc}") from exc
    fields = _Fields(reader)
    arch = fields.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise GGUFImportError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                              f"{sorted(_ARCHITECTURES)}")
    args = _model_args(fields, arch)
    rope_freqs = next((t for t in reader.tensors if str(t.name) == "rope_freqs.weight"), None)
    if rope_freqs is not None:
        if args.rope_scaling is not None:
            raise GGUFImportError(f"{path}: GGUF has both {arch}.rope.scaling.type and "
                                  "rope_freqs.weight; which one applies is unclear")
        args = replace(args, rope_scaling=_llama3_scaling(_float32(rope_freqs), args, path))
    tensors = {hf: array for hf, array in _tensors(reader, args)}
    tied = "lm_head.weight" not in tensors
    args = replace(args, tie_word_embeddings=tied)
    tokenizer, tokenizer_config, generation_config = _tokenizer(fields, path)
    return GGUFModel(config=args.to_hf_config(), tensors=tensors, tokenizer=tokenizer,
                     tokenizer_config=tokenizer_config, generation_config=generation_config,
                     name=str(fields.get("general.name") or Path(path).stem))


class _Fields:
    def __init__(self, reader: Any) -> None:
        self._fields = reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str, path: str | Path) -> Any:
        value = self.get(key)
        if value is None:
            raise GGUFImportError(f"{path}: GGUF lacks {key}")
        return value


def _model_args(fields: _Fields, arch: str) -> ModelArgs:
    def key(name: str) -> Any:
        return fields.require(f"{arch}.{name}", "GGUF")

    dim, n_heads = int(key("embedding_length")), int(key("attention.head_count"))
    tokens = fields.require("tokenizer.ggml.tokens", "GGUF")
    head_dim = int(fields.get(f"{arch}.attention.key_length") or dim // n_heads)
    rotary_dim = fields.get(f"{arch}.rope.dimension_count")
    if rotary_dim is not None and int(rotary_dim) != head_dim:
        raise GGUFImportError(f"GGUF {arch}.rope.dimension_count {rotary_dim} is not the head "
                              f"size {head_dim}: partial rotary embeddings are not supported")
    scaling = None
    scaling_type = fields.get(f"{arch}.rope.scaling.type")
    if scaling_type == "linear":
        scaling = RopeScaling("linear", float(key("rope.scaling.factor")))
    elif scaling_type not in (None, "none"):
        raise GGUFImportError(f"GGUF {arch}.rope.scaling.type {scaling_type!r} is not supported "
                              "(only linear, and Llama 3's rope_freqs.weight)")
    return ModelArgs(
        vocab_size=int(fields.get(f"{arch}.vocab_size") or len(tokens)),
        dim=dim,
        n_layers=int(key("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(fields.get(f"{arch}.attention.head_count_kv") or n_heads),
        intermediate_size=int(key("feed_forward_length")),
        head_dim=head_dim,
        max_seq_len=int(key("context_length")),
        norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        rope_theta=float(fields.get(f"{arch}.rope.freq_base") or 10000.0),
        rope_scaling=scaling,
        qkv_bias=arch == "qwen2",
        architecture=_ARCHITECTURES[arch],
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=fields.get("tokenizer.ggml.eos_token_id"),
        torch_dtype="float32",
    )


def _float32(tensor: Any) -> np.ndarray:
    from gguf.quants import dequantize

    return np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)


def _llama3_scaling(factors: np.ndarray, args: ModelArgs, path: str | Path) -> RopeScaling | None:
    """The Llama 3 rope scaling whose per-frequency divisors ``rope_freqs.weight`` holds.

    llama.cpp's converter writes the divisors and no scaling keys, from low_freq_factor,
    high_freq_factor (default 1 and 4) and an original context of 8192 (it reads no other):
    the values of every Llama 3.x. They are recomputed and must match, or the file is refused.
    """
    factors = factors.astype(np.float64).ravel()
    if factors.shape != (args.head_dim // 2,):
        raise GGUFImportError(f"{path}: rope_freqs.weight has {factors.size} values, not one "
                              f"per rotary frequency ({args.head_dim // 2})")
    if np.allclose(factors, 1.0):
        return None
    scaling = RopeScaling("llama3", float(factors.max()), 1.0, 4.0, 8192)
    inv_freq = args.rope_theta ** -(np.arange(0, args.head_dim, 2) / args.head_dim)
    wavelen = 2 * np.pi / inv_freq
    old, low, high = (scaling.original_max_position_embeddings, scaling.low_freq_factor,
                      scaling.high_freq_factor)
    smooth = (old / wavelen - low) / (high - low)
    with np.errstate(divide="ignore"):  # the formula of the middle band, computed everywhere
        middle = 1 / ((1 - smooth) / scaling.factor + smooth)
    want = np.where(wavelen < old / high, 1.0,
                    np.where(wavelen > old / low, scaling.factor, middle))
    if not np.allclose(factors, want, rtol=1e-5, atol=0):
        raise GGUFImportError(
            f"{path}: rope_freqs.weight is not Llama 3 rope scaling with factor "
            f"{scaling.factor:g}, low_freq_factor 1, high_freq_factor 4 and an original context "
            "of 8192; import the HF directory instead")
    return scaling


def _tensors(reader: Any, args: ModelArgs) -> Any:
    for tensor in reader.tensors:
        name = str(tensor.name)
        if name in _GLOBAL_NAMES:
            hf = _GLOBAL_NAMES[name]
        elif (match := _LAYER.match(name)) and match.group(2) in _LAYER_NAMES:
            hf = f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
        elif name == "rope_freqs.weight":  # in the config's rope_scaling (see read_gguf)
            continue
        else:
            raise GGUFImportError(f"GGUF tensor {name!r} has no place in a "
                                  f"{args.architecture} checkpoint")
        # GGUF lists dims innermost first; numpy's (and HF's) order is the reverse.
        shape = tuple(int(d) for d in reversed(tensor.shape))
        array = _float32(tensor).reshape(shape)
        # llama.cpp interleaves each head's rotary halves for q and k (Llama only; its
        # converter leaves Qwen2 alone); the permutation is undone row-wise.
        if args.architecture == "llama" and hf.endswith(("q_proj.weight", "q_proj.bias")):
            array = _unpermute(array, args.n_heads)
        elif args.architecture == "llama" and hf.endswith(("k_proj.weight", "k_proj.bias")):
            array = _unpermute(array, args.n_kv_heads)
        yield hf, np.ascontiguousarray(array)


def _unpermute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    # Inverse of llama.cpp convert_hf_to_gguf.py's LlamaModel.permute.
    rows = weight.shape[0]
    return (weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _tokenizer(fields: _Fields, path: str | Path
               ) -> tuple[BackendTokenizer, dict[str, Any], dict[str, Any]]:
    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFImportError(f"{path}: tokenizer model {kind!r} is not supported (only GPT-2 "
                              "style byte-level BPE, 'gpt2'); import the HF directory instead")
    pre = str(fields.get("tokenizer.ggml.pre") or "default")
    if pre not in _PRE_TOKENIZERS:
        raise GGUFImportError(f"{path}: pre-tokenizer {pre!r} is not supported; supported: "
                              f"{sorted(_PRE_TOKENIZERS)}")
    tokens: list[str] = list(fields.require("tokenizer.ggml.tokens", path))
    types: list[int] = list(fields.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in fields.require("tokenizer.ggml.merges", path)]
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                          byte_fallback=False))
    backend.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, types, strict=True)
                                if kind == _CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind in zip(tokens, types, strict=True) if kind == _USER_DEFINED])

    def token(key: str) -> str | None:
        index = fields.get(f"tokenizer.ggml.{key}_token_id")
        return None if index is None else tokens[int(index)]

    eos_id = fields.require("tokenizer.ggml.eos_token_id", path)
    config: dict[str, Any] = {
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "pad_token": token("padding"),
        "unk_token": token("unknown"),
        "add_bos_token": bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        "chat_template": fields.get("tokenizer.chat_template"),
        "model_max_length": None,
    }
    eos_ids = sorted({int(eos_id), *[int(i) for i in (fields.get("tokenizer.ggml.eot_token_id"),
                                                       fields.get("tokenizer.ggml.eom_token_id"))
                                     if i is not None]})
    generation = {"bos_token_id": fields.get("tokenizer.ggml.bos_token_id"),
                  "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids}
    return backend, {k: v for k, v in config.items() if v is not None}, generation


def write_hf_directory(model: GGUFModel, out_dir: str | Path) -> Path:
    """Write ``model`` as config.json, model.safetensors and the tokenizer files."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(model.tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(model.config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(model.generation_config, indent=2))
    model.tokenizer.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              **model.tokenizer_config}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    log.info("wrote %s (%d tensors)", out, len(model.tensors))
    return out
