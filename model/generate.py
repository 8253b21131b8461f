"""Reference decoding with the PyTorch model: one sequence, static cache, token by token.

The engines batch and stream; this is the simple path they are checked against (parity tests,
the torch-eager baseline of the edge benchmark) and the scorer behind perplexity.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from model.sampling import make_generator, sample
from model.transformer import Transformer


@torch.inference_mode()
def generate_tokens(
    model: Transformer,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_id: int | None = None,
) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` token ids after ``prompt_ids``; stops after ``eos_id``."""
    device = model.lm_head.weight.device
    total = len(prompt_ids) + max_new_tokens
    if total > model.args.max_seq_len:
        raise ValueError(
            f"prompt ({len(prompt_ids)}) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's context of {model.args.max_seq_len} tokens"
        )
    cache = model.new_cache(n_slots=1, max_len=total)
    params = (
        torch.tensor([temperature], device=device),
        torch.tensor([top_k], device=device),
        torch.tensor([top_p], device=device),
    )
    generators = [make_generator(seed, device)] if seed is not None else None
    tokens = torch.tensor([list(prompt_ids)], device=device)
    pos = torch.arange(len(prompt_ids), device=device)[None]
    logits = model(tokens, pos, cache, logit_index=torch.tensor([len(prompt_ids) - 1]))
    for step in range(max_new_tokens):
        next_id = int(sample(logits, *params, generators)[0])
        yield next_id
        if next_id == eos_id or step == max_new_tokens - 1:
            return
        pos = torch.tensor([[len(prompt_ids) + step]], device=device)
        logits = model(torch.tensor([[next_id]], device=device), pos, cache)[:, -1]


@torch.inference_mode()
def sequence_nll(model: Transformer, ids: Sequence[int]) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats) of ``ids`` and the count scored."""
    if len(ids) < 2:
        return 0.0, 0
    device = model.lm_head.weight.device
    x = torch.tensor([list(ids)], device=device)
    logits = model(x[:, :-1])
    loss = F.cross_entropy(logits[0].float(), x[0, 1:], reduction="sum")
    return float(loss), len(ids) - 1
