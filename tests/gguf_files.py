"""Write a GGUF from a Hugging Face style checkpoint the way llama.cpp's converter does.

Test support for model/gguf_import.py: tests make their own tiny GGUF files (a hub download is
impossible here) with ``gguf.GGUFWriter``, including llama.cpp's q/k row permutation, so the
importer is checked against an independent writer rather than its own inverse.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize
from safetensors.numpy import load_file

_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_gguf(checkpoint: Path, out: Path, *, quantize_to: str = "F32",
               tokenizer_model: str = "gpt2", pre: str = "gpt-2") -> Path:
    """``checkpoint`` (config.json, model.safetensors, tokenizer.json) as a GGUF file."""
    cfg = json.loads((checkpoint / "config.json").read_text())
    arch = cfg["model_type"] if cfg["model_type"] == "qwen2" else "llama"
    tensors = load_file(str(checkpoint / "model.safetensors"))
    writer = GGUFWriter(str(out), arch)
    writer.add_name("tiny test model")
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    _add_tokenizer(writer, checkpoint, cfg, tokenizer_model, pre)
    qtype = GGMLQuantizationType[quantize_to]
    for name, array in tensors.items():
        array = array.astype(np.float32)
        if name.startswith("model.layers."):
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            gguf_name = f"blk.{layer}.{_NAMES[rest]}"
            if arch == "llama" and rest.startswith("self_attn.q_proj"):
                array = _permute(array, cfg["num_attention_heads"])
            elif arch == "llama" and rest.startswith("self_attn.k_proj"):
                array = _permute(array, cfg["num_key_value_heads"])
        else:
            gguf_name = {"model.embed_tokens.weight": "token_embd.weight",
                         "model.norm.weight": "output_norm.weight",
                         "lm_head.weight": "output.weight"}[name]
        if array.ndim == 2 and qtype != GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _add_tokenizer(writer: GGUFWriter, checkpoint: Path, cfg: dict, model: str, pre: str) -> None:
    spec = json.loads((checkpoint / "tokenizer.json").read_text())
    vocab: dict[str, int] = spec["model"]["vocab"]
    tokens = [""] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    special = {t["content"] for t in spec["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(cfg["bos_token_id"])
    writer.add_eos_token_id(cfg["eos_token_id"])
    writer.add_add_bos_token(True)
    writer.add_chat_template(CHAT_TEMPLATE)
