"""Sampling, stop sequences and the reference decoding loop."""

from __future__ import annotations

import torch

from model.config import ModelArgs
from model.generate import generate_tokens, sequence_nll
from model.sampling import make_generator, sample
from model.stopping import StopMatcher
from model.transformer import Transformer


def _params(b: int, t: float, k: int = 0, p: float = 1.0) -> tuple[torch.Tensor, ...]:
    return torch.full((b,), t), torch.full((b,), k), torch.full((b,), p)


def test_greedy_and_degenerate_filters_pick_the_argmax() -> None:
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    best = logits.argmax(-1)
    assert torch.equal(sample(logits, *_params(5, 0.0)), best)
    assert torch.equal(sample(logits, *_params(5, 1.0, k=1)), best)
    assert torch.equal(sample(logits, *_params(5, 1.0, p=1e-6)), best)


def test_frequencies_follow_the_distribution() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20000, 4).contiguous()
    torch.manual_seed(0)
    counts = torch.bincount(sample(logits, *_params(20000, 1.0)), minlength=4).float() / 20000
    assert (counts - probs).abs().max() < 0.02
    # top-k 2 renormalises over the two best; top-p 0.7 keeps {0.5, 0.3} as well.
    for k, p in ((2, 1.0), (0, 0.7)):
        picked = sample(logits, *_params(20000, 1.0, k=k, p=p))
        assert set(picked.tolist()) == {0, 1}
        share0 = (picked == 0).float().mean().item()
        assert abs(share0 - 0.5 / 0.8) < 0.02


def test_seeded_rows_do_not_depend_on_their_batch() -> None:
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(1))
    alone = [
        int(sample(logits[1:2], *_params(1, 0.9), [make_generator(7, "cpu")])[0])
        for _ in range(3)
    ]
    gens = [None, make_generator(7, "cpu"), make_generator(8, "cpu")]
    batched = sample(logits, *_params(3, 0.9), gens)
    assert alone[0] == alone[1] == alone[2] == int(batched[1])


def test_stop_matcher_across_chunks() -> None:
    m = StopMatcher(["\n\n", "END"])
    pieces = ["Hello E", "N", "d of line\n", "\nignored"]
    out = "".join(m.push(p) for p in pieces)
    assert out == "Hello ENd of line"
    assert m.stopped and m.push("more") == "" and m.flush() == ""


def test_stop_matcher_releases_held_text_at_the_end() -> None:
    m = StopMatcher(["STOP"])
    assert m.push("abc ST") == "abc "
    assert m.flush() == "ST"
    assert StopMatcher([]).push("x") == "x"


def _micro() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelArgs.from_name("micro")).eval()


def test_cached_generation_equals_recomputing_everything() -> None:
    model = _micro()
    prompt = [1, 5, 9, 200, 31]
    got = list(generate_tokens(model, prompt, 12))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert got == ids[len(prompt) :]


def test_generation_stops_at_eos_and_checks_context() -> None:
    model = _micro()
    first = next(generate_tokens(model, [1, 2, 3], 5))
    assert list(generate_tokens(model, [1, 2, 3], 5, eos_id=first)) == [first]
    seeded = [list(generate_tokens(model, [1, 2], 8, temperature=1.0, seed=3)) for _ in range(2)]
    assert seeded[0] == seeded[1]
    try:
        list(generate_tokens(model, [1] * 250, 10))
    except ValueError as e:
        assert "context of 256" in str(e)
    else:
        raise AssertionError("an over-long request must be refused")


def test_sequence_nll_matches_cross_entropy() -> None:
    model = _micro()
    ids = [1, 4, 8, 15, 16, 23, 42]
    total, n = sequence_nll(model, ids)
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, :-1]
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum")
    assert n == 6 and abs(total - float(expected)) < 1e-4
