"""A Llama-family decoder-only transformer with an explicit, static KV cache.

Covers Llama 2/3, Qwen2/2.5, Mistral and DeepSeek-R1-Distill checkpoints: RMSNorm, rotary
embeddings (theta, linear and Llama 3 scaling), grouped-query attention, SwiGLU MLP, optional
q/k/v bias (Qwen2), Mistral's sliding window (a mask over the full static cache, not a rolling
buffer) and tied or untied embeddings. Module names follow Hugging Face's
``*ForCausalLM`` so a checkpoint's state dict loads without renaming.

The cache is allocated once, gpt-fast style: ``(n_layers, n_slots, n_kv_heads, max_len,
head_dim)``. Each batch row names the cache slot it owns, so a continuous-batching scheduler
can run rows of different requests at different positions in one step. This file imports only
torch, so the same code path runs on CPU and CUDA.

For serving, ``fuse_projections`` concatenates q/k/v and gate/up into one matrix each (the
original parameters become views of them, so no memory is duplicated): one matrix product
instead of three or two, which matters when a decode step is a chain of small kernels. The
mask is built once per forward; in a decode step grouped-query attention folds the query
heads of each kv head into the query length, so SDPA needs no ``enable_gqa`` support and reads
each kv head once.

References: Llama (Touvron et al. 2023), RoFormer (Su et al. 2021), GQA (Ainslie et al. 2023),
gpt-fast model.py, Hugging Face modeling_llama.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable

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
    """Rotate ``x`` (B, T, nh, hd) by position; the half-split layout of HF checkpoints."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # One fused kernel where the spelled-out formula is seven; it accumulates in fp32
        # (bf16 squares lose too much precision over large hidden sizes).
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        # Set by fuse(): q/k/v stacked into one matrix (the nn.Linear weights become views).
        self.wqkv: Tensor | None = None
        self.bqkv: Tensor | None = None

    def fuse(self) -> None:
        """Stack q/k/v into one matrix; the original parameters become views of it."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        self.wqkv = torch.cat([p.weight.detach() for p in projs])
        if self.q_proj.bias is not None:
            self.bqkv = torch.cat([p.bias.detach() for p in projs])  # type: ignore[union-attr]
        start = 0
        for p in projs:
            n = p.weight.shape[0]
            p.weight = nn.Parameter(self.wqkv[start : start + n], requires_grad=False)
            if self.bqkv is not None:
                p.bias = nn.Parameter(self.bqkv[start : start + n], requires_grad=False)
            start += n

    def _project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, T, nh, hd), k and v (B, T, nkv, hd), rotary embedding applied."""
        B, T, _ = x.shape
        nh, nkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        if self.wqkv is None:
            q = self.q_proj(x).view(B, T, nh, hd)
            k = self.k_proj(x).view(B, T, nkv, hd)
            v = self.v_proj(x).view(B, T, nkv, hd)
            return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v
        qkv = F.linear(x, self.wqkv, self.bqkv)
        # Rotate q and k together: one pass of the elementwise kernels instead of two.
        qk = apply_rope(qkv[..., : (nh + nkv) * hd].view(B, T, nh + nkv, hd), cos, sin)
        v = qkv[..., (nh + nkv) * hd :].view(B, T, nkv, hd)
        return qk[:, :, :nh], qk[:, :, nh:], v

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: tuple[Tensor, Tensor, int, Tensor] | None,
        input_pos: Tensor,
        slots: Tensor | None,
        mask: Tensor | None,
    ) -> Tensor:
        B, T, _ = x.shape
        nh, nkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self._project(x, cos, sin)  # (B, T, nh|nkv, hd)

        if cache is None or mask is None:
            # Whole-sequence forward (training, scoring): causal attention, with the sliding
            # window's mask (T, T) where the sequence is longer than the window.
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                attn_mask=mask, is_causal=mask is None, enable_gqa=True,
            ).transpose(1, 2)  # (B, T, nh, hd)
            return self.o_proj(y.reshape(B, T, nh * hd))

        # The whole cache (n_layers, n_slots, nkv, max_len, hd), this layer's index as an int
        # and as a (1,) tensor (a 0-d one would index like an int).
        k_all, v_all, layer, layer_id = cache
        k_cache, v_cache = k_all[layer], v_all[layer]  # (n_slots, nkv, max_len, hd)
        L = mask.shape[-1]
        rows = slots if slots is not None else torch.arange(B, device=x.device)
        # Advanced indices around a slice put the indexed dims first: (B, T, nkv, hd). The
        # write indexes the whole cache, not this layer's view of it: torch.compile turns an
        # in-place write through a view of an input into a copy of the whole cache per layer,
        # but a write into the input itself stays in place.
        idx = rows[:, None].expand(B, T)
        k_all[layer_id, idx, :, input_pos] = k.to(k_all.dtype)
        v_all[layer_id, idx, :, input_pos] = v.to(v_all.dtype)
        if slots is None:
            # Row b owns slot b (the decode step): a view, no gather of the whole cache.
            keys, values = k_cache[:B, :, :L], v_cache[:B, :, :L]  # (B, nkv, L, hd)
        else:
            keys, values = k_cache[rows, :, :L], v_cache[rows, :, :L]
        keys, values = keys.to(q.dtype), values.to(q.dtype)
        group = nh // nkv
        if T == 1:
            # Decode, GQA: the `group` query heads of one kv head become `group` query rows
            # of it, so every kv head is read once and SDPA sees plain multi-head attention.
            q = q.reshape(B, nkv, group, hd)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            return self.o_proj(y.reshape(B, 1, nh * hd))
        # Prefill: repeat kv heads (a small copy next to T queries' work) so the masked,
        # memory-efficient kernel runs; SDPA's own GQA support is narrower across backends.
        if group > 1:
            keys = keys.repeat_interleave(group, dim=1)
            values = values.repeat_interleave(group, dim=1)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, nh * hd))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=False)
        self.w_gate_up: Tensor | None = None  # set by fuse()

    def fuse(self) -> None:
        """Stack gate and up into one matrix; the original parameters become views of it."""
        n = self.gate_proj.weight.shape[0]
        self.w_gate_up = torch.cat([self.gate_proj.weight.detach(), self.up_proj.weight.detach()])
        self.gate_proj.weight = nn.Parameter(self.w_gate_up[:n], requires_grad=False)
        self.up_proj.weight = nn.Parameter(self.w_gate_up[n:], requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.w_gate_up is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = F.linear(x, self.w_gate_up).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


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

    def fuse_projections(self) -> None:
        """For serving: one q/k/v and one gate/up matrix per layer (same values, fewer kernels).

        The model stays loadable and usable everywhere, but its state dict now holds views;
        save a checkpoint from an unfused model.
        """
        for layer in self.model.layers:
            assert isinstance(layer, DecoderLayer)  # ModuleList hands out plain Modules
            layer.self_attn.fuse()
            layer.mlp.fuse()

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
        layer_call: Callable[..., Tensor] | None = None,
    ) -> Tensor:
        """Logits for ``tokens`` (B, T).

        ``input_pos`` (B, T) are absolute positions (default 0..T-1). With ``cache``, each
        row's keys and values are written at its positions in cache slot ``slots[b]`` (default
        b) and attention reads that slot's first ``kv_len`` entries (default all).
        ``logit_index`` (B,) picks one position per row and returns (B, V) instead of
        (B, T, V), which saves the vocabulary projection of every prompt token in prefill.
        ``layer_call(layer, *args)``, if given, runs each decoder layer instead of
        ``layer(*args)`` (the cloud engine passes a compiled one).
        """
        B, T = tokens.shape
        if input_pos is None:
            input_pos = torch.arange(T, device=tokens.device).expand(B, T)
        freqs = input_pos[..., None].float() * self.inv_freq  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None]  # (B, T, 1, hd)
        x = self.model.embed_tokens(tokens)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        window = self.args.sliding_window
        mask = None
        if cache is not None:
            L = min(kv_len if kv_len is not None else cache.max_len, cache.max_len)
            # A query at position p sees cache entries 0..p of its own slot; entries beyond
            # are stale (an earlier request, or padding) and are masked out, and so are those
            # before p - window + 1. Additive, built once for all layers: SDPA would convert
            # a boolean mask in every layer.
            keys = torch.arange(L, device=x.device)[None, None, :]
            visible = keys <= input_pos[:, :, None]  # (B, T, L)
            if window is not None:
                visible &= keys > input_pos[:, :, None] - window
            mask = torch.zeros(visible.shape, dtype=x.dtype, device=x.device)
            mask = mask.masked_fill(~visible, float("-inf"))[:, None]  # (B, 1, T, L)
        elif window is not None and window < T:
            # Without a cache the tokens are positions 0..T-1 of one sequence per row.
            pos = torch.arange(T, device=x.device)
            mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
        # Only a cached forward writes the cache, and needs each layer's index as a tensor.
        layer_ids = torch.arange(len(self.model.layers), device=x.device) if cache is not None \
            else None
        for i, layer in enumerate(self.model.layers):
            layer_cache = (cache.k, cache.v, i, layer_ids[i : i + 1]) \
                if cache is not None and layer_ids is not None else None
            args = (x, cos, sin, layer_cache, input_pos, slots, mask)
            x = layer(*args) if layer_call is None else layer_call(layer, *args)
        if logit_index is not None:
            x = x[torch.arange(B, device=x.device), logit_index][:, None]
        logits = self.lm_head(self.model.norm(x))
        return logits[:, 0] if logit_index is not None else logits
