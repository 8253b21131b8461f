"""Token ids in, user-visible text out: incremental detokenization plus stop sequences.

Standard library and ``tokenizers`` only: the cloud engine and edge nodes both stream with it.
"""

from __future__ import annotations

from collections.abc import Sequence

from model.stopping import StopMatcher
from model.tokenizer import IncrementalDecoder, Tokenizer


class TextStream:
    """Feed generated ids with ``push``; text never shows a partial character or a stop string."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = ()) -> None:
        self._decoder = IncrementalDecoder(tokenizer)
        self._matcher = StopMatcher(stops)

    @property
    def stopped(self) -> bool:
        """A stop sequence matched: generation should end now."""
        return self._matcher.stopped

    def push(self, token_id: int) -> str:
        return self._matcher.push(self._decoder.push(token_id))

    def finish(self) -> str:
        """The text still held back, released at the end of generation."""
        tail = self._matcher.push(self._decoder.flush())
        return tail + self._matcher.flush()
