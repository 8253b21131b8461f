"""The cloud GPU path on CPU: fused projections, bucketed decode, chunked prefill, padding rows.

CUDA graphs only exist on CUDA, but they capture exactly the function that runs eagerly here
(cloud/decode_graphs.py), so greedy output identical to the reference decoding loop on CPU
checks the path's logic: slot-packed buckets, padding rows, kv-length buckets, prompt chunks
interleaved with running decodes. benchmarks/cloud_gpu.py repeats the check on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from cloud.batch_step import BatchStepper, DecodeConfig
from cloud.batcher import ContinuousBatcher, TokenSequence
from cloud.decode_graphs import buckets, round_up
from cloud.scheduler import Scheduler, SchedulerConfig
from model.checkpoint import load_checkpoint
from model.config import ModelArgs
from model.demo import DEMO_DIR
from model.generate import generate_tokens
from model.transformer import Transformer


@pytest.fixture(scope="module")
def reference() -> Transformer:
    return load_checkpoint(DEMO_DIR / "cloud").eval()


def test_buckets_cover_every_size() -> None:
    assert buckets(256, 1) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256]
    assert buckets(500, 128) == [128, 192, 256, 384, 500]
    sizes = buckets(37, 1)
    assert all(round_up(sizes, n) >= n for n in range(1, 38))
    assert round_up(sizes, 5) == 6
    with pytest.raises(ValueError, match="exceeds"):
        round_up(sizes, 38)


@torch.inference_mode()
def test_fused_projections_give_the_same_logits() -> None:
    torch.manual_seed(0)
    args = ModelArgs.from_name("micro", qkv_bias=True, architecture="qwen2")
    model = Transformer(args).eval()
    tokens = torch.randint(0, args.vocab_size, (2, 12))
    before = model(tokens)
    n_params = sum(p.numel() for p in model.parameters())
    model.fuse_projections()
    assert torch.allclose(model(tokens), before, atol=1e-5)
    # The original weights are views of the fused ones: no memory is duplicated.
    attn = model.model.layers[0].self_attn
    assert attn.wqkv is not None
    assert attn.k_proj.weight.untyped_storage().data_ptr() == attn.wqkv.untyped_storage().data_ptr()
    assert sum(p.numel() for p in model.parameters()) == n_params


def _run(model: Transformer, prompts: list[list[int]], max_new: list[int], *, slots: int,
         chunk: int, min_kv_bucket: int) -> list[list[int]]:
    """Serve ``prompts`` token-level through the batcher, as the engine thread does."""
    cache = model.new_cache(slots, 160)
    config = DecodeConfig(cuda_graphs=True, min_kv_bucket=min_kv_bucket)
    stepper = BatchStepper(model, cache, config)
    scheduler: Scheduler[TokenSequence] = Scheduler(
        SchedulerConfig(slots=slots, max_queue=64, max_prefill_tokens=chunk),
        cost=lambda s: len(s.prompt_ids),
    )
    limit = {}

    def on_token(seq: TokenSequence, token: int, now: float) -> bool:
        return len(seq.generated) >= limit[id(seq)]

    batcher = ContinuousBatcher(stepper, scheduler, on_token)
    seqs = [TokenSequence(prompt_ids=p) for p in prompts]
    for seq, n in zip(seqs, max_new, strict=True):
        limit[id(seq)] = n
    # Staggered arrivals: some join while others decode, some while a prompt is half done.
    pending = list(seqs)
    for _ in range(1000):
        if pending:
            scheduler.submit(pending.pop(0))
        if not pending and scheduler.idle:
            break
        batcher.step()
    assert scheduler.idle
    # Chunks of `chunk` tokens: more steps than a whole-prompt prefill would need.
    assert batcher.steps > max(max_new)
    return [s.generated for s in seqs]


@torch.inference_mode()
@pytest.mark.parametrize("fuse", [True, False])
def test_fast_path_greedy_equals_reference(reference: Transformer, fuse: bool) -> None:
    """Chunked prefill, slot reuse and bucketed decode give the reference loop's tokens."""
    model = load_checkpoint(DEMO_DIR / "cloud").eval()
    if fuse:
        model.fuse_projections()
    g = torch.Generator().manual_seed(7)
    vocab = model.args.vocab_size
    lengths = [3, 41, 9, 17, 1, 30, 12, 5]
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    max_new = [20, 12, 33, 8, 25, 16, 40, 10]
    got = _run(model, prompts, max_new, slots=3, chunk=7, min_kv_bucket=16)
    for prompt, n, ids in zip(prompts, max_new, got, strict=True):
        ref = list(generate_tokens(reference, prompt, n))
        assert ids == ref, f"prompt of {len(prompt)} tokens"


class _RecordingStepper:
    """Stands in for BatchStepper: records each step's prefill rows, answers token 0."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.prefills: list[list[tuple[int, list[int], int]]] = []

    def step(self, prefill: list, decode: list) -> list[int]:
        self.prefills.append([(r.slot, list(r.tokens), r.start) for r in prefill])
        return [0] * (sum(r.sample for r in prefill) + len(decode))


def test_prefill_budget_counts_padding() -> None:
    """A step's chunks, right-padded to the longest, never exceed max_prefill_tokens."""
    budget = 16
    stepper = _RecordingStepper()
    scheduler: Scheduler[TokenSequence] = Scheduler(
        SchedulerConfig(slots=8, max_queue=64, max_prefill_tokens=budget),
        cost=lambda s: len(s.prompt_ids),
    )
    batcher = ContinuousBatcher(stepper, scheduler, lambda s, t, now: len(s.generated) >= 2)
    lengths = [30, 5, 3, 20, 1, 7, 2, 16]
    seqs = [TokenSequence(prompt_ids=list(range(100 * i, 100 * i + n)))
            for i, n in enumerate(lengths)]
    for seq in seqs:
        scheduler.submit(seq)
    for _ in range(100):
        if scheduler.idle:
            break
        batcher.step()
    assert scheduler.idle and all(len(s.generated) == 2 for s in seqs)
    seen: dict[int, list[int]] = {}  # prompt tokens prefilled, per prompt (slots are reused)
    for rows in stepper.prefills:
        if rows:
            assert len(rows) * max(len(t) for _, t, _ in rows) <= budget
        for _, tokens, start in rows:
            owner = tokens[0] // 100
            assert start == len(seen.setdefault(owner, []))  # chunks in order, none skipped
            seen[owner] += tokens
    assert [seen[i] for i in range(len(seqs))] == [s.prompt_ids for s in seqs]
    # Several prompts shared a step when they fit: the budget is not one prompt per step.
    assert any(len(rows) > 1 for rows in stepper.prefills)
