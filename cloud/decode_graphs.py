"""The decode step over a static batch: one CUDA graph per (batch bucket, kv-length bucket).

A decode step is a few hundred small kernels; launched one by one from Python they leave the
GPU idle most of the time (the cloud tier used to be bound by exactly that). Captured once as a
CUDA graph, the step is one launch. A graph fixes every shape, so the step always runs rows
0..B-1 where row b is KV-cache slot b (the scheduler packs running sequences into the lowest
slots), and attention always reads the first L cache positions; B and L are rounded up to
buckets (powers of two and halfway points between them), so a handful of graphs serve every
batch. Rows of the bucket that hold no decoding sequence are padding: they write their own
slot's last cache position, which no sequence reads before writing it itself (see ``PAD``).

On CUDA the captured function is the step with its layers compiled by TorchInductor
(cloud/compiled_step.py), which fuses its elementwise kernels; if compiling fails, the eager
step is captured instead and ``compile_error`` says why. On CPU, or with graphs switched off,
the same function runs eagerly: one code path.
References: gpt-fast generate.py (static cache, compiled decode step), vLLM's CUDA graph
runner (batch-size buckets, padded rows).
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from cloud.compiled_step import CompiledDecodeStep, decode_step
from model.transformer import KVCache, Transformer

log = logging.getLogger(__name__)


def buckets(limit: int, first: int) -> list[int]:
    """``first``, doubling, with the halfway point between doublings, up to ``limit``."""
    first = max(1, min(first, limit))
    out = {limit}
    size = first
    while size < limit:
        out.add(size)
        if size >= 2 and size + size // 2 < limit:
            out.add(size + size // 2)
        size *= 2
    return sorted(out)


def round_up(sizes: Sequence[int], n: int) -> int:
    """The smallest bucket that holds ``n``."""
    i = bisect.bisect_left(sizes, n)
    if i == len(sizes):
        raise ValueError(f"{n} exceeds the largest bucket {sizes[-1]}")
    return sizes[i]


class DecodeGraphs:
    """Runs one decode step of ``model`` for slots 0..B-1; captures it per bucket on CUDA."""

    def __init__(
        self,
        model: Transformer,
        cache: KVCache,
        *,
        max_batch: int,
        min_kv_bucket: int,
        use_graphs: bool,
        use_compile: bool = False,
    ) -> None:
        self.model, self.cache = model, cache
        self.device = cache.k.device
        self.batch_buckets = buckets(max_batch, 1)
        self.kv_buckets = buckets(cache.max_len, min_kv_bucket)
        self.use_graphs = use_graphs and self.device.type == "cuda"
        # Compiled only where captured: the compiler's Python guards on every eager call
        # would cost about what fusing saves.
        self._step = CompiledDecodeStep(cache) if use_compile and self.use_graphs else decode_step
        self.compile_error: str | None = None
        self.capture_s = 0.0  # spent capturing graphs, compiling included
        # The kv length reaches the step as this tensor's length (see decode_step).
        self._kv_positions = torch.arange(cache.max_len, device=self.device)
        # Padding rows write here: a sequence's last position is at most max_len - 2 (the
        # context check leaves room for one generated token), so no owner ever reads it.
        self.pad_position = cache.max_len - 1
        # Row 0 tokens, row 1 positions: the graph's inputs, refilled by one copy per step.
        self._inputs = torch.zeros((2, max_batch), dtype=torch.long, device=self.device)
        pin = self.device.type == "cuda"
        self._staging = torch.zeros((2, max_batch), dtype=torch.long, pin_memory=pin)
        self._staging_np = self._staging.numpy()
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}
        self._pool: torch.cuda._POOL_HANDLE | None = None  # graph.pool()'s type

    @property
    def captured(self) -> list[tuple[int, int]]:
        return sorted(self._graphs)

    @property
    def compiled(self) -> bool:
        return isinstance(self._step, CompiledDecodeStep)

    def bucket(self, n_rows: int, kv_len: int) -> tuple[int, int]:
        return round_up(self.batch_buckets, n_rows), round_up(self.kv_buckets, kv_len)

    def run(self, slots: Sequence[int], tokens: Sequence[int], positions: Sequence[int]
            ) -> tuple[Tensor, Tensor]:
        """Decode ``tokens[i]`` at ``positions[i]`` in cache slot ``slots[i]``.

        Returns fp32 logits (B, V) and greedy next tokens (B,) for the whole bucket; row b is
        slot b. The tensors belong to the graph: read them before the next ``run``.
        """
        B, L = self.bucket(max(slots) + 1, max(positions) + 1)
        staged = self._staging_np
        staged[0, :B] = 0
        staged[1, :B] = self.pad_position
        staged[0, slots] = tokens
        staged[1, slots] = positions
        self._inputs[:, :B].copy_(self._staging[:, :B], non_blocking=True)
        if not self.use_graphs:
            return self._forward(B, L)
        entry = self._graphs.get((B, L))
        if entry is None:
            entry = self._capture(B, L)
        graph, logits, greedy = entry
        graph.replay()
        return logits, greedy

    def warm_up(self, batch_sizes: Iterable[int], max_kv_len: int) -> int:
        """Capture the buckets of ``batch_sizes`` (every kv bucket up to ``max_kv_len``) now,
        rather than stall a step on first use. Only while no sequence runs: every row is
        padding and writes its slot's pad position. Returns how many graphs were made.
        """
        if not self.use_graphs:
            return 0
        L_max = round_up(self.kv_buckets, max_kv_len)
        self._staging[0].zero_()
        self._staging[1].fill_(self.pad_position)
        self._inputs.copy_(self._staging)
        made = 0
        for B in sorted({round_up(self.batch_buckets, n) for n in batch_sizes}):
            for L in self.kv_buckets[: self.kv_buckets.index(L_max) + 1]:
                if (B, L) not in self._graphs:
                    self._capture(B, L)
                    made += 1
        return made

    def _forward(self, B: int, L: int) -> tuple[Tensor, Tensor]:
        tokens, positions = self._inputs[0, :B, None], self._inputs[1, :B, None]  # (B, 1)
        return self._step(self.model, self.cache, tokens, positions, self._kv_positions[:L])

    def _capture(self, B: int, L: int) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor]:
        # Warm up outside the graph first (cuBLAS handles and workspaces are created lazily).
        # The warm-up writes the same keys and values the replay writes next: harmless.
        # A new compile (first B == 1 or B >= 2 bucket) happens in this warm-up run too.
        start = time.monotonic()
        side = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]  # torch: unannotated
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            try:
                self._forward(B, L)
            except Exception as e:  # compiler failure: serve with the eager step, loudly
                if not self.compiled:
                    raise
                self.compile_error = f"{type(e).__name__}: {e}"[:2000]
                log.warning("compiling the decode step failed, capturing it eagerly: %s",
                            self.compile_error)
                self._step = decode_step
                self._forward(B, L)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # One memory pool for every graph: their intermediates are never live at once.
        with torch.cuda.graph(graph, pool=self._pool):
            logits, greedy = self._forward(B, L)
        self._pool = graph.pool()
        self._graphs[(B, L)] = (graph, logits, greedy)
        self.capture_s += time.monotonic() - start
        log.info("captured the decode step for batch %d, kv length %d (%d graphs)",
                 B, L, len(self._graphs))
        return graph, logits, greedy
