"""How long a sequence each cloud slot can hold: the KV cache sized from memory and slots.

The cache is static (``slots x context`` positions, allocated once), so its size is a choice
made at start: the model's context (8,192 for SmolLM2), capped by ``--max-context``, and by
what the memory budget holds for the configured slots. The budget is ``--kv-cache-memory``, or
a share of what is free once the weights are loaded (most of a GPU's free memory, which serves
nothing else; a quarter of a CPU host's available memory, which other processes share).
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from model.config import ModelArgs

# Shares of free memory the cache may take when no budget is given.
GPU_SHARE = 0.85
CPU_SHARE = 0.25
# A slot shorter than this serves no real conversation: refuse to start instead.
MIN_CONTEXT = 256


@dataclass(frozen=True)
class KVPlan:
    """The chosen context per slot and why."""

    context: int
    slots: int
    bytes_per_token: int
    budget_bytes: int
    limited_by: str  # "model", "max_context" or "memory"

    @property
    def cache_bytes(self) -> int:
        return self.context * self.slots * self.bytes_per_token

    def describe(self) -> str:
        return (f"{self.slots} slots x {self.context} tokens ({self.limited_by}: "
                f"{self.cache_bytes / 2**20:.0f} MiB of a {self.budget_bytes / 2**20:.0f} MiB "
                "budget)")


def bytes_per_token(args: ModelArgs, dtype: torch.dtype) -> int:
    """Cache bytes one position of one sequence takes: keys and values of every layer."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * args.n_layers * args.n_kv_heads * args.head_dim * element


def free_memory(device: torch.device) -> int:
    """Bytes the cache could take on ``device`` now (before the share is applied)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return int(psutil.virtual_memory().available)


def plan_kv_cache(
    args: ModelArgs, dtype: torch.dtype, device: torch.device, slots: int, *,
    max_context: int | None = None, budget_bytes: int | None = None,
) -> KVPlan:
    """The context each of ``slots`` gets; ValueError saying what to change if it is too short."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    per_token = bytes_per_token(args, dtype)
    if budget_bytes is None:
        share = GPU_SHARE if device.type == "cuda" else CPU_SHARE
        budget_bytes = int(free_memory(device) * share)
    fits = budget_bytes // (slots * per_token)
    limits = [(args.max_seq_len, "model"), (fits, "memory")]
    if max_context is not None:
        limits.append((max_context, "max_context"))
    context, limited_by = min(limits, key=lambda item: item[0])
    if context < min(MIN_CONTEXT, args.max_seq_len):
        raise ValueError(
            f"a KV cache budget of {budget_bytes / 2**20:.0f} MiB holds {fits} tokens per slot "
            f"for {slots} slots ({per_token} bytes a token); at least "
            f"{min(MIN_CONTEXT, args.max_seq_len)} are needed: lower --slots or raise "
            "--kv-cache-memory"
        )
    return KVPlan(context, slots, per_token, budget_bytes, limited_by)
