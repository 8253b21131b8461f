"""The decode step, and the same step with compiled decoder layers, for CUDA graphs to capture.

Run eagerly, a decode step of the 1.5B model is ~600 kernels, ~550 of them small elementwise
ones (norms, rotary, SiLU, residual adds, cache writes) that cost a third of the step at
batch 1 even inside a CUDA graph. TorchInductor fuses them into a few Triton kernels per
layer; the matrix products stay with cuBLAS. ``DecodeGraphs`` then captures the compiled step
per bucket exactly as it captured the eager one.

What is compiled is one decoder layer, not the whole step: every layer of a model has the
same code and shapes, so one compile serves all of them, where the whole 28-layer step took
~110 s per compile on the H100 machine. The batch (rows 0..B-1) and the kv length L are
marked dynamic, so one compile serves every bucket with B >= 2 and one more serves B = 1
(PyTorch specialises dimensions of size 1, and batch 1 is worth its own code). The cache's
slot and length dimensions are dynamic too, so caches of other sizes reuse the code.

References: gpt-fast generate.py (compiled decode step over a static cache), vLLM (its own
CUDA graphs over a torch.compile'd model, batch buckets).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from model.transformer import KVCache, Transformer

log = logging.getLogger(__name__)


def decode_step(
    model: Transformer, cache: KVCache, tokens: Tensor, positions: Tensor, kv_positions: Tensor,
    layer_call: Callable[..., Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """fp32 logits (B, V) and greedy tokens (B,) for ``tokens`` (B, 1) at ``positions`` (B, 1).

    Row b is cache slot b; attention reads ``len(kv_positions)`` cache positions.
    """
    L = kv_positions.shape[0]
    logits = model(tokens, positions, cache, None, kv_len=L, layer_call=layer_call)
    logits = logits[:, -1].float()
    return logits, logits.argmax(dim=-1)


def _run_layer(layer: nn.Module, *args: object) -> Tensor:
    out: Tensor = layer(*args)  # Module.__call__ is typed Any
    return out


class CompiledDecodeStep:
    """``decode_step`` with each decoder layer run through ``torch.compile`` (CUDA)."""

    def __init__(self, cache: KVCache) -> None:
        # One dynamo cache entry per (model shape, dtype, B == 1 or not, first layer or not);
        # the default limit of 8 would silently fall back to eager after a few models in one
        # process (the benchmark serves four).
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
        for t in (cache.k, cache.v):
            for dim in (1, 3):  # slots, max_len
                if t.shape[dim] >= 2:
                    torch._dynamo.maybe_mark_dynamic(t, dim)
        # fullgraph: a graph break would leave eager kernels in the layer unnoticed; an error
        # instead lets DecodeGraphs fall back to the eager step and say why.
        self._layer = torch.compile(_run_layer, fullgraph=True)

    def _call_layer(self, layer: nn.Module, x: Tensor, cos: Tensor, sin: Tensor,
                    cache: tuple[Tensor, Tensor, int, Tensor], input_pos: Tensor,
                    slots: Tensor | None, mask: Tensor) -> Tensor:
        if x.shape[0] >= 2:
            for t in (x, cos, sin, input_pos, mask):
                torch._dynamo.maybe_mark_dynamic(t, 0)
        torch._dynamo.maybe_mark_dynamic(mask, 3)
        return self._layer(layer, x, cos, sin, cache, input_pos, slots, mask)

    def __call__(
        self, model: Transformer, cache: KVCache, tokens: Tensor, positions: Tensor,
        kv_positions: Tensor,
    ) -> tuple[Tensor, Tensor]:
        return decode_step(model, cache, tokens, positions, kv_positions, self._call_layer)
