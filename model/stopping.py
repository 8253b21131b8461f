"""Stop sequences over streamed text (standard library only: edge nodes use it too).

Text arrives in pieces; a stop string may straddle two of them. The matcher holds back the
shortest tail that could still grow into a stop string and releases everything before it, so a
stream never shows text that turns out to belong to a stop sequence.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feed generated text with ``push``; it returns what is safe to emit."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Add ``text``; return the part that can be emitted now (nothing after a stop)."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return buf[: min(hits)]
        keep = self._partial_suffix(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """At the end of generation the held tail is plain text after all."""
        out, self._held = ("" if self.stopped else self._held), ""
        return out

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:n]):
                    best = n
                    break
        return best
