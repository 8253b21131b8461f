"""The request and token rate per step, bounded, and saved so a restart keeps its forecast.

Without the file a restarted autoscaler would forecast nothing for a day (the models need a
season of history) and scale on the rate alone. Saved atomically after every step.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.durable import write_atomic

log = logging.getLogger(__name__)


@dataclass
class RateHistory:
    """Rates of consecutive clock-aligned steps, the last ending at step ``last_index``."""

    step_s: float
    max_steps: int
    season: int
    last_index: int | None = None
    requests: list[float] = field(default_factory=list)
    tokens: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.requests)

    def append(self, index: int, requests_rps: float, tokens_rps: float) -> int:
        """Add step ``index``; returns how many steps were added (more than one after a gap,
        filled with the values a season earlier). A gap longer than a season starts over."""
        if self.last_index is not None and index <= self.last_index:
            return 0
        gap = 0 if self.last_index is None else index - self.last_index - 1
        if gap > self.season:
            log.warning("rate history: %d steps missing, more than a season; starting over", gap)
            self.requests.clear()
            self.tokens.clear()
            gap = 0
        for series, value in ((self.requests, requests_rps), (self.tokens, tokens_rps)):
            for _ in range(gap):
                series.append(series[-self.season] if len(series) >= self.season else
                              (series[-1] if series else value))
            series.append(value)
            del series[:-self.max_steps]
        self.last_index = index
        return gap + 1

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.requests), np.asarray(self.tokens)

    def save(self, path: Path) -> None:
        write_atomic(path, json.dumps({
            "step_s": self.step_s, "last_index": self.last_index,
            "requests": self.requests, "tokens": self.tokens}))

    @classmethod
    def load(cls, path: Path | None, step_s: float, max_steps: int, season: int
             ) -> RateHistory:
        """The saved history if ``path`` holds one of the same step, else an empty one."""
        empty = cls(step_s, max_steps, season)
        if path is None or not path.exists():
            return empty
        try:
            saved = json.loads(path.read_text())
            if float(saved["step_s"]) != step_s:
                log.warning("%s has steps of %s s, not %s s: not using it", path,
                            saved["step_s"], step_s)
                return empty
            requests = [float(v) for v in saved["requests"]][-max_steps:]
            tokens = [float(v) for v in saved["tokens"]][-max_steps:]
            last = saved["last_index"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("cannot read rate history %s (%s): starting without", path, e)
            return empty
        if len(requests) != len(tokens):
            log.warning("rate history %s is inconsistent: starting without", path)
            return empty
        return cls(step_s, max_steps, season, None if last is None else int(last), requests,
                   tokens)
