"""Byte-level BPE: training, exact round trips, HF-compatible files, streaming decode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.corpus import load_corpus
from model.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    IncrementalDecoder,
    Tokenizer,
    train_bpe_tokenizer,
)

VOCAB_SIZE = 512
SAMPLES = [
    "Hello, world! def f(x):\n    return x ** 2\n",
    "  leading and trailing spaces  \t\r\n",
    "café, naïve, Ærøskøbing, Straße, ñandú",
    "日本語のテキストと中文文本，한국어",
    "emoji 🎉🚀 with a family 👨‍👩‍👧 and a flag 🇫🇷",
    "\x00\x07 control bytes and U+FFFD \ufffd itself",
    "",
]


def _training_texts() -> list[str]:
    corpus = load_corpus()
    return corpus.texts("text") + corpus.texts("numeric")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_bpe_tokenizer(_training_texts(), VOCAB_SIZE)


@pytest.fixture(scope="module")
def saved_dir(tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tokenizer.save(tmp_path_factory.mktemp("tokenizer"))


def test_training_is_deterministic(tokenizer: Tokenizer) -> None:
    again = train_bpe_tokenizer(_training_texts(), VOCAB_SIZE)
    assert again.backend.to_str() == tokenizer.backend.to_str()


def test_special_tokens_and_vocab_size(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == VOCAB_SIZE
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert [tokenizer.backend.id_to_token(i) for i in range(3)] == [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]
    # BPE merges were learned: common words cost fewer tokens than bytes.
    assert tokenizer.token_count(" the function returns") < len(" the function returns") / 2


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_exact(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_id
    assert tokenizer.encode(text, add_bos=False) == ids[1:]
    assert tokenizer.token_count(text) == len(ids) - 1
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=False) == BOS_TOKEN + text


def test_encode_batch_matches_encode(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode_batch(SAMPLES) == [tokenizer.encode(t) for t in SAMPLES]
    assert tokenizer.encode_batch(SAMPLES, add_bos=False) == [
        tokenizer.encode(t, add_bos=False) for t in SAMPLES
    ]


def test_too_small_vocab_is_rejected() -> None:
    with pytest.raises(ValueError, match="vocab_size must exceed 259"):
        train_bpe_tokenizer(["abc"], 259)


def test_saved_files_reload_with_the_same_ids(tokenizer: Tokenizer, saved_dir: Path) -> None:
    config = json.loads((saved_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (
        BOS_TOKEN,
        EOS_TOKEN,
        PAD_TOKEN,
    )
    assert (config["add_bos_token"], config["add_eos_token"]) == (True, False)
    assert config["added_tokens_decoder"]["2"]["content"] == EOS_TOKEN
    special_map = json.loads((saved_dir / "special_tokens_map.json").read_text())
    assert special_map == {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    assert not [p.name for p in saved_dir.iterdir() if p.name.startswith(".")]  # no temp files

    loaded = Tokenizer.from_dir(saved_dir)
    assert (loaded.pad_id, loaded.bos_id, loaded.eos_id) == (0, 1, 2)
    assert loaded.encode_batch(SAMPLES) == tokenizer.encode_batch(SAMPLES)
    assert loaded.backend.to_str() == tokenizer.backend.to_str()


def test_from_dir_without_config_and_with_object_tokens(saved_dir: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_bytes((saved_dir / "tokenizer.json").read_bytes())
    assert Tokenizer.from_dir(bare).bos_id == 1

    # Hugging Face also writes special tokens as objects; a model without BOS (Qwen2) has null.
    config = {"eos_token": {"content": EOS_TOKEN, "special": True}, "bos_token": None}
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    qwen_like = Tokenizer.from_dir(bare)
    assert (qwen_like.bos_id, qwen_like.eos_id, qwen_like.pad_id) == (None, 2, 2)
    assert qwen_like.encode("hi") == qwen_like.encode("hi", add_bos=False)

    (bare / "tokenizer_config.json").write_text(json.dumps({"eos_token": None}))
    with pytest.raises(ValueError, match="no eos token"):
        Tokenizer.from_dir(bare)


def test_transformers_loads_the_files_with_the_same_ids(
    tokenizer: Tokenizer, saved_dir: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(saved_dir)
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    assert len(hf) == VOCAB_SIZE
    for text in SAMPLES:
        ids = tokenizer.encode(text)
        assert hf(text)["input_ids"] == ids
        assert hf.encode(text, add_special_tokens=False) == ids[1:]
        assert hf.decode(ids, skip_special_tokens=True) == text


def _stream(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@settings(max_examples=150, deadline=None)
@given(text=st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\ufffd")))
def test_streaming_equals_full_decode_on_random_text(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_bos=False)
    chunks = _stream(tokenizer, ids)
    assert "".join(chunks) == tokenizer.decode(ids) == text
    # Nothing emitted ends mid-character: the text has no U+FFFD, so no chunk may.
    assert not [chunk for chunk in chunks if "\ufffd" in chunk]


@settings(max_examples=150, deadline=None)
@given(
    ids=st.lists(st.integers(0, VOCAB_SIZE - 1), max_size=40),
    skip=st.booleans(),
    batch=st.integers(1, 4),
)
def test_streaming_equals_full_decode_on_random_ids(
    tokenizer: Tokenizer, ids: list[int], skip: bool, batch: int
) -> None:
    # Arbitrary ids include lone continuation bytes and special tokens; pushes come in batches.
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=skip)
    chunks = [decoder.push(ids[i : i + batch]) for i in range(0, len(ids), batch)]
    chunks.append(decoder.flush())
    assert "".join(chunks) == tokenizer.decode(ids, skip_special_tokens=skip)
    assert not [chunk for chunk in chunks[:-1] if chunk.endswith("\ufffd")]


def test_streaming_holds_back_a_split_character(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("🎉", add_bos=False)
    assert len(ids) > 1  # four bytes, and no merge for them in a 512-token vocabulary
    decoder = IncrementalDecoder(tokenizer)
    assert [decoder.push(i) for i in ids] == [""] * (len(ids) - 1) + ["🎉"]
    assert decoder.flush() == ""
    decoder.push(ids[0])
    assert decoder.flush() == "\ufffd" == tokenizer.decode(ids[:1])
    assert decoder.push(tokenizer.encode("ok", add_bos=False)) == "ok"  # reset after flush


class _WindowSpy(Tokenizer):
    """Records the longest id list each decode call saw."""

    longest = 0

    def decode(self, ids: object, skip_special_tokens: bool = True) -> str:
        type(self).longest = max(type(self).longest, len(ids))  # type: ignore[arg-type]
        return super().decode(ids, skip_special_tokens)  # type: ignore[arg-type]


def test_streaming_decodes_a_short_window_only(tokenizer: Tokenizer) -> None:
    spy = _WindowSpy(tokenizer.backend, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN)
    text = " ".join(load_corpus().texts("numeric")[:20]) + " 日本語 🎉" * 20
    ids = tokenizer.encode(text, add_bos=False)
    assert len(ids) > 2000
    chunks = _stream(spy, ids)
    assert "".join(chunks) == text
    assert _WindowSpy.longest <= 8  # a few tokens, not the whole stream


def test_bos_and_eos_follow_the_model_files(saved_dir: Path, tmp_path: Path) -> None:
    import shutil

    chat = Path(shutil.copytree(saved_dir, tmp_path / "chat"))
    config = json.loads((chat / "tokenizer_config.json").read_text())
    (chat / "tokenizer_config.json").write_text(json.dumps(config | {"add_bos_token": False}))
    (chat / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    ours, plain = Tokenizer.from_dir(chat), Tokenizer.from_dir(saved_dir)
    # SmolLM2/Qwen2 style: the model has a BOS token but never wants it prepended.
    assert ours.bos_id == plain.bos_id is not None and not ours.adds_bos and plain.adds_bos
    assert ours.encode("def f():") == plain.encode("def f():", add_bos=False)
    assert plain.encode("def f():")[0] == plain.bos_id
    assert ours.eos_ids == {2, 7} and plain.eos_ids == {plain.eos_id}
    ours.save(tmp_path / "again")
    assert not Tokenizer.from_dir(tmp_path / "again").adds_bos  # save keeps the model's choice
