"""Batched next-token sampling on the device: greedy, temperature, top-k, top-p, per-row seeds.

Every row of a batch may belong to a different request with its own parameters, so they come
in as (B,) tensors. A request with a seed draws its noise from its own generator, which makes
its output independent of which other requests share the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def sample(
    logits: Tensor,
    temperature: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    generators: Sequence[torch.Generator | None] | None = None,
    *,
    any_sampled: bool | None = None,
) -> Tensor:
    """Pick one token per row of ``logits`` (B, V); temperature 0 means greedy.

    ``top_k`` 0 and ``top_p`` 1 disable those filters. ``generators[b]`` (optional) drives
    row b's randomness. ``any_sampled``: whether some row has temperature > 0, when the caller
    knows; otherwise it is read off the device, which costs a host synchronisation.
    """
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    sampled_rows = temperature > 0
    if any_sampled is None:
        any_sampled = generators is not None or bool(sampled_rows.any())
    if not any_sampled:
        return greedy
    scaled = logits / temperature.clamp_min(1e-6)[:, None]
    sorted_logits, sorted_idx = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    # top-k: drop ranks >= k (k = 0 keeps everything).
    k = torch.where(top_k > 0, top_k, logits.shape[-1])[:, None]
    sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    # top-p: drop a token when the mass before it already reaches p (the first always stays).
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Exponential race (Gumbel-max in disguise): argmax p / E with E ~ Exp(1) samples from p.
    noise = torch.empty_like(probs)
    if generators is None:
        noise.exponential_(1.0)
    else:
        for row, gen in enumerate(generators):
            noise[row].exponential_(1.0, generator=gen)
    choice = (probs / noise).argmax(dim=-1, keepdim=True)
    picked = sorted_idx.gather(-1, choice)[:, 0]
    return torch.where(sampled_rows, picked, greedy)


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator seeded for one request, or None to share the global one."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen
