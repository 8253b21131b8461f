"""A Llama-family decoder-only transformer with an explicit, static KV cache.

Covers Llama 2/3, Qwen2/2.5, Mistral and DeepSeek-R1-Distill checkpoints: RMSNorm, rotary
embeddings (theta, linear and Llama 3 scaling), grouped-query attention, SwiGLU MLP, optional
q/k/v bias (Qwen2) and tied or untied embeddings. Module names follow Hugging Face's
``*ForCausalLM`` so a checkpoint's state dict loads without renaming.

The cache is allocated once, gpt-fast style: ``(n_layers, n_slots, n_kv_heads, max_len,
head_dim)``. Each batch row names the cache slot it owns, so a continuous-batching scheduler
can run rows of different requests at different positions in one step. This file imports only
torch, so the same code path runs on CPU and CUDA.

References: Llama (Touvron et al. 2023), RoFormer (Su et al. 2021), GQA (Ainslie et al. 2023),
gpt-fast model.py, Hugging Face modeling_llama.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelArgs


class KVCache:
    """Static key/value storage for every layer: ``(n_layers, n_slots, n_kv, max_len, hd)``."""

    def __init__(
        self,
        args: ModelArgs,
        n_slots: int,
        max_len: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (args.n_layers, n_slots, args.n_kv_heads, max_len, args.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.n_slots = n_slots
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


def rope_inv_freq(args: ModelArgs, device: torch.device | str | None = None) -> Tensor:
    """Rotary inverse frequencies (head_dim/2,), with linear or Llama 3 scaling applied."""
    hd = args.head_dim
    inv_freq = 1.0 / (
        args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd)
    )
    scaling = args.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # Llama 3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (B, nh, T, hd) by position; the half-split layout of HF checkpoints."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32: bf16 squares lose too much precision over large hidden sizes.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: tuple[Tensor, Tensor] | None,
        input_pos: Tensor,
        slots: Tensor | None,
        kv_len: int | None,
    ) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (B, nh|nkv, T, hd)

        if cache is None:
            # Whole-sequence forward (training, scoring): plain causal attention.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            k_cache, v_cache = cache  # (n_slots, nkv, L, hd)
            rows = slots if slots is not None else torch.arange(B, device=x.device)
            # Advanced indices around a slice put the indexed dims first: (B, T, nkv, hd).
            idx = rows[:, None].expand(B, T)
            k_cache[idx, :, input_pos] = k.transpose(1, 2).to(k_cache.dtype)
            v_cache[idx, :, input_pos] = v.transpose(1, 2).to(v_cache.dtype)
            L = kv_len if kv_len is not None else k_cache.shape[2]
            keys, values = k_cache[rows, :, :L], v_cache[rows, :, :L]  # (B, nkv, L, hd)
            # A query at position p sees cache entries 0..p of its own slot; entries beyond
            # are stale (an earlier request, or padding) and are masked out.
            mask = torch.arange(L, device=x.device)[None, None, :] <= input_pos[:, :, None]
            y = F.scaled_dot_product_attention(
                q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask[:, None], enable_gqa=True
            )
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x: Tensor, *attn_args: object) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), *attn_args)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Embeddings, layers and final norm: HF's ``model.`` prefix of the state dict."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)


class Transformer(nn.Module):
    """The causal LM: ``forward(tokens, input_pos, cache, slots)`` returns logits."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model = Decoder(args)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)

    def reset_rope(self, device: torch.device | str) -> None:
        """Recompute the rotary table, e.g. after building the model on the meta device."""
        self.inv_freq = rope_inv_freq(self.args, device)

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def new_cache(
        self, n_slots: int, max_len: int | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """Allocate a static KV cache for ``n_slots`` sequences of up to ``max_len`` tokens."""
        weight = self.lm_head.weight
        return KVCache(
            self.args,
            n_slots,
            max_len or self.args.max_seq_len,
            dtype=dtype or weight.dtype,
            device=weight.device,
        )

    def forward(
        self,
        tokens: Tensor,
        input_pos: Tensor | None = None,
        cache: KVCache | None = None,
        slots: Tensor | None = None,
        *,
        kv_len: int | None = None,
        logit_index: Tensor | None = None,
    ) -> Tensor:
        """Logits for ``tokens`` (B, T).

        ``input_pos`` (B, T) are absolute positions (default 0..T-1). With ``cache``, each
        row's keys and values are written at its positions in cache slot ``slots[b]`` (default
        b) and attention reads that slot's first ``kv_len`` entries (default all).
        ``logit_index`` (B,) picks one position per row and returns (B, V) instead of
        (B, T, V), which saves the vocabulary projection of every prompt token in prefill.
        """
        B, T = tokens.shape
        if input_pos is None:
            input_pos = torch.arange(T, device=tokens.device).expand(B, T)
        freqs = input_pos[..., None].float() * self.inv_freq  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
        x = self.model.embed_tokens(tokens)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for i, layer in enumerate(self.model.layers):
            layer_cache = (cache.k[i], cache.v[i]) if cache is not None else None
            x = layer(x, cos, sin, layer_cache, input_pos, slots, kv_len)
        if logit_index is not None:
            x = x[torch.arange(B, device=x.device), logit_index][:, None]
        logits = self.lm_head(self.model.norm(x))
        return logits[:, 0] if logit_index is not None else logits
