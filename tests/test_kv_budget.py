"""The cloud KV cache is sized from the model, the cap and the memory budget, and says why."""

from __future__ import annotations

import pytest
import torch

from cloud.kv_budget import bytes_per_token, plan_kv_cache
from model.config import ModelArgs

# The SmolLM2-135M shape: 30 layers, 3 KV heads of 64.
ARGS = ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152,
                 intermediate_size=1536, max_seq_len=8192)
CPU = torch.device("cpu")


def test_bytes_per_token_counts_keys_and_values_of_every_layer() -> None:
    assert bytes_per_token(ARGS, torch.float32) == 2 * 30 * 3 * 64 * 4
    assert bytes_per_token(ARGS, torch.bfloat16) == 2 * 30 * 3 * 64 * 2


def test_the_smallest_limit_wins_and_is_named() -> None:
    per_token = bytes_per_token(ARGS, torch.float32)
    roomy = plan_kv_cache(ARGS, torch.float32, CPU, 8, budget_bytes=8 * 8192 * per_token)
    assert (roomy.context, roomy.limited_by) == (8192, "model")
    capped = plan_kv_cache(ARGS, torch.float32, CPU, 8, max_context=2048,
                           budget_bytes=8 * 8192 * per_token)
    assert (capped.context, capped.limited_by) == (2048, "max_context")
    tight = plan_kv_cache(ARGS, torch.float32, CPU, 8, budget_bytes=8 * 1000 * per_token)
    assert (tight.context, tight.limited_by) == (1000, "memory")
    assert tight.cache_bytes <= tight.budget_bytes and "memory" in tight.describe()


def test_a_budget_too_small_for_the_slots_is_refused_with_what_to_change() -> None:
    with pytest.raises(ValueError, match="lower --slots or raise --kv-cache-memory"):
        plan_kv_cache(ARGS, torch.float32, CPU, 64, budget_bytes=2**20)
