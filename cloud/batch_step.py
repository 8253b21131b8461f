"""One engine step on the device: prefill chunks, one decode step, sampling, one host sync.

Token ids in, token ids out; no requests, text or threads here (the batcher and the engine
own those). Prefill chunks of several sequences run as one right-padded forward; the decode
step runs through ``DecodeGraphs``; greedy rows take the argmax computed on the device, other
rows go through ``model.sampling.sample`` on the device. The step's new tokens come back to
the host in a single ``tolist()``: the only synchronisation of the step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from cloud.decode_graphs import DecodeGraphs
from model.sampling import sample
from model.transformer import KVCache, Transformer


@dataclass(frozen=True)
class DecodeConfig:
    # Capture the decode step as CUDA graphs (CUDA only; CPU always runs it eagerly).
    cuda_graphs: bool = True
    # Compile the captured step with torch.compile, fusing its elementwise kernels (with
    # cuda_graphs only). Costs one compile per model for batch 1 and one for larger batches
    # (tens of seconds each, at the first use of such a bucket, or in DecodeGraphs.warm_up).
    compile: bool = True
    # Let prefill attention use cuDNN. Off: cuDNN builds a plan for every new prompt-chunk
    # shape (~100 us of CPU per call even when cached, stalls of up to a second when not);
    # the memory-efficient kernel takes the same masks without either.
    prefill_cudnn_attention: bool = False
    # Smallest kv-length bucket: attention reads at least this many cache positions.
    min_kv_bucket: int = 128
    # One q/k/v and one gate/up matrix per layer: fewer, larger matrix products.
    fuse_projections: bool = True


@dataclass(slots=True)
class Row:
    """One sequence's work in a step: ``tokens`` at positions ``start``.. in cache ``slot``."""

    slot: int
    tokens: Sequence[int]
    start: int
    # Draw the next token after the last of ``tokens`` (False for a prompt chunk that is not
    # the prompt's last).
    sample: bool = True
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    generator: torch.Generator | None = None


class BatchStepper:
    """Owns the model's device work for a continuous batch over a static, slotted KV cache."""

    def __init__(self, model: Transformer, cache: KVCache, config: DecodeConfig) -> None:
        self.model, self.cache, self.config = model, cache, config
        self.device = cache.k.device
        self.graphs = DecodeGraphs(
            model, cache, max_batch=cache.n_slots, min_kv_bucket=config.min_kv_bucket,
            use_graphs=config.cuda_graphs, use_compile=config.compile,
        )
        backends = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
        if config.prefill_cudnn_attention:
            backends.insert(0, SDPBackend.CUDNN_ATTENTION)
        self.prefill_backends = backends

    def step(self, prefill: Sequence[Row], decode: Sequence[Row]) -> list[int]:
        """Next token of every row with ``sample`` set: prefill rows first, then decode rows.

        A decode row holds one token, the sequence's last; prefill rows hold prompt chunks.
        """
        parts: list[Tensor] = []
        picks: list[int] = []  # where each sampled row's token lies in the concatenation
        offset = 0
        if prefill:
            ids = self._prefill(prefill)
            picks += range(ids.shape[0])
            parts.append(ids)
            offset = ids.shape[0]
        if decode:
            ids, rows = self._decode(decode)
            picks += [offset + r for r in rows]
            parts.append(ids)
        if not parts:
            return []
        flat = (torch.cat(parts) if len(parts) > 1 else parts[0]).tolist()  # the one sync
        return [flat[i] for i in picks]

    def _prefill(self, rows: Sequence[Row]) -> Tensor:
        width = max(len(r.tokens) for r in rows)
        last = self.cache.max_len - 1
        tokens = [list(r.tokens) + [0] * (width - len(r.tokens)) for r in rows]
        # Right padding: pad tokens are written past each row's end (clamped into the cache)
        # and masked out; the row's own later tokens overwrite them before anyone reads them.
        positions = [[min(r.start + t, last) for t in range(width)] for r in rows]
        with sdpa_kernel(self.prefill_backends):
            logits = self.model(
                torch.tensor(tokens).to(self.device, non_blocking=True),
                torch.tensor(positions).to(self.device, non_blocking=True),
                self.cache,
                torch.tensor([r.slot for r in rows]).to(self.device, non_blocking=True),
                kv_len=max(r.start + len(r.tokens) for r in rows),
                logit_index=torch.tensor([len(r.tokens) - 1 for r in rows]).to(self.device),
            )  # (n, V)
        chosen = [i for i, r in enumerate(rows) if r.sample]
        if not chosen:
            return torch.empty(0, dtype=torch.long, device=self.device)
        if len(chosen) < len(rows):
            logits = logits[torch.tensor(chosen, device=self.device)]
        return self._sample(logits.float(), [rows[i] for i in chosen], None)

    def _decode(self, rows: Sequence[Row]) -> tuple[Tensor, list[int]]:
        """Next tokens on the device and, per row, its index in them."""
        slots = [r.slot for r in rows]
        logits, greedy = self.graphs.run(
            slots, [r.tokens[-1] for r in rows], [r.start for r in rows]
        )
        if all(r.temperature <= 0 and r.generator is None for r in rows):
            return greedy, slots  # row b of the bucket is slot b
        index = torch.tensor(slots).to(self.device, non_blocking=True)
        return self._sample(logits[index], rows, greedy[index]), list(range(len(rows)))

    def _sample(self, logits: Tensor, rows: Sequence[Row], greedy: Tensor | None) -> Tensor:
        """Sampled (or greedy) next tokens for ``rows``, one per row of fp32 ``logits``."""
        sampled = any(r.temperature > 0 for r in rows)
        gens = [r.generator for r in rows]
        with_gen = any(g is not None for g in gens)
        if not sampled and not with_gen:
            return greedy if greedy is not None else logits.argmax(dim=-1)
        return sample(
            logits,
            torch.tensor([r.temperature for r in rows]).to(self.device, non_blocking=True),
            torch.tensor([r.top_k for r in rows]).to(self.device, non_blocking=True),
            torch.tensor([r.top_p for r in rows]).to(self.device, non_blocking=True),
            gens if with_gen else None,
            any_sampled=sampled or with_gen,
        )
