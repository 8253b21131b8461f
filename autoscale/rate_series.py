"""Real request-rate series for backtests and replays, read where they lie (never copied).

``shared/data/rates`` beside the repository holds Alibaba ServeGen's per-model aggregate rates
(10-minute windows, 14 days, Apache-2.0) and NAB series (5- and 30-minute counts, MIT-style);
each folder's SOURCE.txt gives licence and columns. ``TANDEM_RATES_DIR`` points elsewhere.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

DAY_S = 86_400.0


@dataclass(frozen=True)
class RateSeries:
    """A rate sampled every ``step_s`` seconds; ``unit`` says what one value counts."""

    name: str
    step_s: float
    values: np.ndarray
    unit: str

    @property
    def season(self) -> int:
        """Steps in one day."""
        return round(DAY_S / self.step_s)

    def horizon(self, seconds: float) -> int:
        """Steps that cover ``seconds`` ahead (at least one)."""
        return max(1, int(np.ceil(seconds / self.step_s - 1e-9)))


def rates_dir() -> Path | None:
    """``TANDEM_RATES_DIR``, else ``../shared/data/rates`` beside the repository, if present."""
    env = os.environ.get("TANDEM_RATES_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data" / "rates"
    return path if path.is_dir() else None


def load_servegen(root: Path, model: str) -> RateSeries:
    """``aggregate_rate_<model>.csv``: requests/s summed over clients per 10-minute window."""
    path = root / "servegen_alibaba" / f"aggregate_rate_{model}.csv"
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    start = [float(r["window_start_s"]) for r in rows[:2]]
    values = np.array([float(r["total_rate_rps"]) for r in rows])
    return RateSeries(f"servegen/{model}", start[1] - start[0], values, "req/s")


def load_nab(root: Path, name: str) -> RateSeries:
    """A NAB count series (``timestamp,value``); the step is the median timestamp gap."""
    path = root / "nab_rate_series" / f"{name}.csv"
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    times = np.array([datetime.fromisoformat(r["timestamp"]).timestamp() for r in rows])
    values = np.array([float(r["value"]) for r in rows])
    step = float(np.median(np.diff(times)))
    # Counts per bucket: a count divided by the bucket is a rate, so forecasts are in /s too.
    return RateSeries(f"nab/{name}", step, values / step, "events/s")
