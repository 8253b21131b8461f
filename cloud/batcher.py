"""Continuous batching over token ids: admit, chunked prefill, decode, hand tokens out.

The loop the cloud engine runs between its own bookkeeping (cancellation, deadlines, text),
kept free of requests and text so that benchmarks drive exactly this code with token ids.
Each ``step``: waiting sequences take free slots (the scheduler decides who), prompts are
prefilled in chunks of at most ``max_prefill_tokens`` per step, padding included, in admission
order, so a long prompt never stalls the running decodes for more than one chunk, and every
sequence that has a token decodes one more. One host synchronisation per step
(``BatchStepper.step``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

from cloud.batch_step import BatchStepper, Row
from cloud.scheduler import Scheduler
from model.sampling import make_generator


@dataclass(eq=False, kw_only=True)
class TokenSequence:
    """A sequence's token-level state while it holds a KV-cache slot."""

    prompt_ids: list[int]
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    slot: int = -1
    prefilled: int = 0  # prompt tokens already in the cache
    generator: torch.Generator | None = None
    generated: list[int] = field(default_factory=list)
    started: float = 0.0  # when it took a slot
    first_token: float = 0.0
    cancelled: bool = False
    done: bool = False


S = TypeVar("S", bound=TokenSequence)


class ContinuousBatcher(Generic[S]):
    """Runs steps for the sequences of ``scheduler``; ``on_token`` says when one is finished.

    ``on_token(seq, token, now)`` is called for every new token (already appended to
    ``seq.generated``) and returns True when the sequence is complete; its slot is then freed.
    Engine thread only.
    """

    def __init__(
        self,
        stepper: BatchStepper,
        scheduler: Scheduler[S],
        on_token: Callable[[S, int, float], bool],
    ) -> None:
        self.stepper, self.scheduler, self.on_token = stepper, scheduler, on_token
        self._prefilling: deque[S] = deque()  # admitted, prompt not fully in the cache
        self.steps = 0

    def step(self) -> None:
        now = time.monotonic()
        device = self.stepper.device
        for slot, seq in self.scheduler.admit():
            seq.slot, seq.started = slot, now
            seq.generator = make_generator(seq.seed, device)
            self._prefilling.append(seq)
        prefill, prefill_seqs = self._prefill_rows()
        decode_seqs = [s for s in self.scheduler.running.values() if s.generated and not s.done]
        decode = [self._row(s, s.generated[-1:], len(s.prompt_ids) + len(s.generated) - 1)
                  for s in decode_seqs]
        if not prefill and not decode:
            return
        tokens = self.stepper.step(prefill, decode)
        self.steps += 1
        now = time.monotonic()
        for seq, token in zip(prefill_seqs + decode_seqs, tokens, strict=True):
            if not seq.generated:
                seq.first_token = now
            seq.generated.append(token)
            if self.on_token(seq, token, now):
                self.finish(seq)

    def finish(self, seq: S) -> None:
        """Free the sequence's slot (finished, cancelled or expired)."""
        if seq.done:
            return
        seq.done = True
        self.scheduler.release(seq.slot, time.monotonic() - seq.started)

    def _prefill_rows(self) -> tuple[list[Row], list[S]]:
        """Prompt chunks for this step, within the budget; and the sequences they complete."""
        while self._prefilling and self._prefilling[0].done:
            self._prefilling.popleft()
        budget = self.scheduler.config.max_prefill_tokens
        rows: list[Row] = []
        completing: list[S] = []
        width = 0  # the longest chunk so far
        for seq in self._prefilling:
            if seq.done:
                continue
            # The chunks run as one right-padded (rows x width) forward, so the budget counts
            # the padding too: n rows may hold at most budget // n tokens each. Counting only
            # real tokens let one long chunk next to a few short ones cost several budgets
            # (the per-token p99 of the trace replay).
            cap = budget // (len(rows) + 1)
            if cap <= 0 or width > cap:
                break
            end = min(len(seq.prompt_ids), seq.prefilled + cap)
            last = end == len(seq.prompt_ids)
            rows.append(self._row(seq, seq.prompt_ids[seq.prefilled : end], seq.prefilled, last))
            width = max(width, end - seq.prefilled)
            seq.prefilled = end
            if last:
                completing.append(seq)
        if completing:
            self._prefilling = deque(s for s in self._prefilling if s.prefilled < len(s.prompt_ids))
        return rows, completing

    @staticmethod
    def _row(seq: TokenSequence, tokens: list[int], start: int, sample: bool = True) -> Row:
        return Row(seq.slot, tokens, start, sample, seq.temperature, seq.top_k, seq.top_p,
                   seq.generator)
