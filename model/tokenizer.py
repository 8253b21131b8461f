"""Byte-level BPE tokenizer: training, Hugging Face style files, and streaming decode.

Edge nodes use this file without torch, so it imports only ``tokenizers`` and the stdlib.
Byte-level BPE (GPT-2's pre-tokenizer and decoder) covers all 256 bytes, so any UTF-8 text
round-trips exactly and there is no unknown token. The saved directory follows the Hugging Face
conventions that both ``transformers.AutoTokenizer`` and onnxruntime-genai (onnxruntime-
extensions) read: ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from core.durable import write_atomic
from core.errors import InvalidRequest
from core.request import ChatMessage
from model.chat import ChatTemplate, template_source

log = logging.getLogger(__name__)

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|pad|>", "<|bos|>", "<|eos|>"
# Their position is their id: <|pad|>=0, <|bos|>=1, <|eos|>=2.
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# The class onnxruntime-extensions maps to its BPE tokenizer with GPT-2's split pattern, and
# that transformers loads from tokenizer.json alone.
TOKENIZER_CLASS = "PreTrainedTokenizerFast"
_MIN_VOCAB = len(SPECIAL_TOKENS) + 256


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2
) -> Tokenizer:
    """Train a byte-level BPE tokenizer of ``vocab_size`` tokens; deterministic for equal input."""
    if vocab_size <= _MIN_VOCAB:
        raise ValueError(
            f"vocab_size must exceed {_MIN_VOCAB} (specials + 256 bytes), got {vocab_size}"
        )
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        # Every byte is in the vocabulary even if the corpus lacks it: no text is unencodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    # Hugging Face loaders add BOS from the post-processor (as Llama 3 does); ours adds it
    # explicitly in encode(), and the two agree.
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A",
                pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
                special_tokens=[(BOS_TOKEN, SPECIAL_TOKENS.index(BOS_TOKEN))],
            ),
        ]
    )
    log.info("trained byte-level BPE: %d tokens", backend.get_vocab_size())
    return Tokenizer(backend, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)


class Tokenizer:
    """A ``tokenizers.Tokenizer`` (``backend``) with its special tokens; HF style directories."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token: str | None,
        eos_token: str,
        pad_token: str | None = None,
        config: dict[str, Any] | None = None,
        eos_ids: Iterable[int] = (),
    ) -> None:
        self.backend = backend
        self._bos_token, self._eos_token = bos_token, eos_token
        eos_id = backend.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"eos token {eos_token!r} is not in the vocabulary")
        self._eos_id: int = eos_id
        self._bos_id = None if bos_token is None else backend.token_to_id(bos_token)
        if bos_token is not None and self._bos_id is None:
            raise ValueError(f"bos token {bos_token!r} is not in the vocabulary")
        # Without a pad token, pad with EOS: padded positions are masked out anyway.
        self._pad_token = pad_token if pad_token is not None else eos_token
        pad_id = backend.token_to_id(self._pad_token)
        if pad_id is None:
            raise ValueError(f"pad token {pad_token!r} is not in the vocabulary")
        self._pad_id: int = pad_id
        # A loaded tokenizer_config.json, kept so save() writes back what we do not manage.
        self._config = dict(config or {})
        # BOS only where the model wants it: SmolLM2 and Qwen2 say add_bos_token=false and
        # derail after one they never saw in training. A config without the key (ours) adds it.
        self._add_bos = bool(self._config.get("add_bos_token", True))
        self._eos_ids = frozenset({self._eos_id, *(eos_ids or ())})

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load ``tokenizer.json`` (and the special tokens of ``tokenizer_config.json``)."""
        path = Path(path)
        backend = BackendTokenizer.from_file(str(path / TOKENIZER_FILE))
        config: dict[str, Any] = {}
        if (path / CONFIG_FILE).is_file():
            config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
            bos, eos, pad = (
                _token_content(config.get(k)) for k in ("bos_token", "eos_token", "pad_token")
            )
        else:
            vocab = backend.get_vocab()
            bos, eos, pad = (t if t in vocab else None for t in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN))
        if eos is None:
            raise ValueError(f"{path} names no eos token; generation could never stop")
        return cls(backend, bos_token=bos, eos_token=eos, pad_token=pad, config=config,
                   eos_ids=_generation_eos_ids(path))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the three Hugging Face tokenizer files into directory ``path``; returns it."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        specials = {
            "bos_token": self._bos_token,
            "eos_token": self._eos_token,
            "pad_token": self._pad_token,
        }
        config = {
            "tokenizer_class": TOKENIZER_CLASS,
            # onnxruntime-extensions adds BOS/EOS only as these flags say; HF reads them too.
            "add_bos_token": self._bos_id is not None,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": self._added_tokens_decoder(),
            "model_input_names": ["input_ids", "attention_mask"],
            # A loaded config keeps its other keys; the special tokens are what we resolved.
            **self._config,
            **specials,
        }
        special_map = {key: value for key, value in specials.items() if value is not None}
        _write_atomic(path / TOKENIZER_FILE, self.backend.to_str(pretty=True))
        _write_atomic(path / CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False))
        _write_atomic(path / SPECIAL_TOKENS_MAP_FILE, json.dumps(special_map, indent=2))
        return path

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        """Id of the beginning-of-sequence token (None for models without one, e.g. Qwen2)."""
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def eos_ids(self) -> frozenset[int]:
        """Every id that ends generation: the eos token and generation_config.json's list."""
        return self._eos_ids

    @property
    def adds_bos(self) -> bool:
        """Whether ``encode(add_bos=True)`` prepends BOS (the model has one and wants it)."""
        return self._add_bos and self._bos_id is not None

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @functools.cached_property
    def chat_template(self) -> ChatTemplate | None:
        """The model's chat template (tokenizer_config.json), or None when it has none."""
        source = template_source(self._config)
        if source is None:
            return None
        unk = _token_content(self._config.get("unk_token"))
        return ChatTemplate(source, {"bos_token": self._bos_token, "eos_token": self._eos_token,
                                     "pad_token": self._pad_token, "unk_token": unk})

    def prompt_text(self, prompt: str, messages: Sequence[ChatMessage] = ()) -> str:
        """What the model reads: ``messages`` rendered with its chat template, else ``prompt``."""
        if not messages:
            return prompt
        if self.chat_template is None:
            raise InvalidRequest(
                "this model has no chat template, so it cannot take messages: send a prompt"
            )
        return self.chat_template.render(messages)

    def encode_prompt(self, prompt: str, messages: Sequence[ChatMessage] = ()) -> list[int]:
        """Ids of a request's prompt: rendered ``messages`` or ``prompt`` (see ``prompt_text``).

        A rendered conversation gets no BOS added: the template writes the special tokens it
        wants (transformers' ``apply_chat_template`` does the same).
        """
        return self.encode(self.prompt_text(prompt, messages), add_bos=not messages)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``, after BOS when ``add_bos`` and the model has and wants one."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return self._with_bos(ids, add_bos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = True) -> list[list[int]]:
        """:meth:`encode` for many texts, in parallel in the Rust backend."""
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [self._with_bos(enc.ids, add_bos) for enc in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; bytes that are not valid UTF-8 become U+FFFD."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_count(self, text: str) -> int:
        """Number of tokens in ``text``, without BOS (what rate limits and context checks count)."""
        return len(self.backend.encode(text, add_special_tokens=False).ids)

    def _with_bos(self, ids: list[int], add_bos: bool) -> list[int]:
        if add_bos and self._add_bos and self._bos_id is not None:
            return [self._bos_id, *ids]
        return ids

    def _added_tokens_decoder(self) -> dict[str, dict[str, Any]]:
        # transformers' tokenizer_config.json form of tokenizer.json's "added_tokens".
        keys = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
        added = self.backend.get_added_tokens_decoder()
        return {str(i): {key: getattr(added[i], key) for key in keys} for i in sorted(added)}


class IncrementalDecoder:
    """Turns a stream of token ids into text, never emitting part of a UTF-8 character.

    A byte-level token can end inside a multi-byte character. Like text-generation-inference
    and vLLM, we decode only a short window (from ``prefix`` on) and emit the text past
    ``read`` once it no longer ends in U+FFFD; each push costs O(window), not O(all tokens).
    Everything pushed, then :meth:`flush`, concatenates to ``decode(all_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []  # the window: ids from the prefix offset on
        self._read = 0  # ids before this index in the window have been emitted

    def push(self, token_ids: int | Iterable[int]) -> str:
        """Add token ids; return the text they complete (possibly empty)."""
        self._ids.extend([token_ids] if isinstance(token_ids, int) else token_ids)
        prefix_text = self._decode(self._ids[: self._read])
        text = self._decode(self._ids)
        if len(text) <= len(prefix_text) or text.endswith("\ufffd"):
            return ""  # nothing new, or a character still incomplete
        # Ids before the old read offset are dropped; the ones just emitted stay as the next
        # window's prefix, context the decoder may need (e.g. SentencePiece's leading space).
        del self._ids[: self._read]
        self._read = len(self._ids)
        return text[len(prefix_text) :]

    def flush(self) -> str:
        """Return what is held back (an incomplete character decodes to U+FFFD) and reset."""
        prefix_text = self._decode(self._ids[: self._read])
        text = self._decode(self._ids)
        self._ids, self._read = [], 0
        return text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)


def _generation_eos_ids(path: Path) -> list[int]:
    # generation_config.json lists every end-of-turn id (Llama 3 has three); an int or a list.
    try:
        value = json.loads((path / GENERATION_CONFIG_FILE).read_text()).get("eos_token_id")
    except FileNotFoundError:
        return []
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json writes a special token as a string or as {"content": ..., ...}.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _write_atomic(path: Path, text: str) -> None:
    # A reader (an edge node swapping models) never sees half a file.
    write_atomic(path, text)
