"""A small LSTM forecaster in PyTorch, trained on the history window it is fitted on.

Input at each of the last ``window`` steps: the rate now and the rate one season earlier,
shifted by the horizon, so the last positions carry yesterday's values at the times being
forecast. The network predicts the correction to seasonal-naive for the next ``horizon``
steps at once (direct multi-step), on rates divided by the window's mean. Small on purpose
(one layer, 32 units, a few hundred Adam steps): it is refitted daily on a CPU.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch
from torch import nn

WINDOW = 12
HORIZON = 3
HIDDEN = 32
TRAIN_STEPS = 200
BATCH = 64
LR = 1e-2


class _Net(nn.Module):
    def __init__(self, hidden: int, horizon: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size=2, hidden_size=hidden, batch_first=True)
        self.head = nn.Linear(hidden, horizon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, window, 2)
        out, _ = self.lstm(x)  # (B, window, hidden)
        return self.head(out[:, -1])  # (B, horizon)


class LSTMForecaster:
    """Seasonal-naive corrected by an LSTM over the recent window; see the module docstring."""

    name = "lstm"

    def __init__(self, season: int, window: int = WINDOW, horizon: int = HORIZON,
                 hidden: int = HIDDEN, train_steps: int = TRAIN_STEPS, seed: int = 0) -> None:
        if season < horizon:
            raise ValueError(f"lstm needs a season of at least {horizon} steps, got {season}")
        self.season, self.window, self.horizon = season, window, horizon
        self.hidden, self.train_steps, self.seed = hidden, train_steps, seed
        self._buf: deque[float] = deque(maxlen=season + window)
        self._net: _Net | None = None
        self._scale = 1.0

    @property
    def min_history(self) -> int:
        # A season of lags for the first window, and a few dozen training examples.
        return self.season + self.window + self.horizon + 32

    def _inputs(self, x: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """(N, window, 2): the window ending at each index in ``ends`` (inclusive)."""
        pos = ends[:, None] + np.arange(-self.window + 1, 1)[None, :]  # (N, window)
        lag = x[pos - self.season + self.horizon]
        return np.stack([x[pos], lag], axis=-1)

    def _baseline(self, x: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """(N, horizon): seasonal-naive for the steps after each end."""
        return x[ends[:, None] + np.arange(1, self.horizon + 1)[None, :] - self.season]

    def fit(self, history: np.ndarray) -> None:
        if len(history) < self.min_history:
            raise ValueError(f"lstm needs {self.min_history} observations, got {len(history)}")
        y = np.maximum(np.asarray(history, dtype=np.float64), 0.0)
        self._scale = float(y.mean()) or 1.0
        x = y / self._scale
        ends = np.arange(self.season + self.window - 1 - self.horizon, len(x) - self.horizon)
        inputs = torch.tensor(self._inputs(x, ends), dtype=torch.float32)
        targets = x[ends[:, None] + np.arange(1, self.horizon + 1)[None, :]]
        residual = torch.tensor(targets - self._baseline(x, ends), dtype=torch.float32)
        gen = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        net = _Net(self.hidden, self.horizon)
        opt = torch.optim.Adam(net.parameters(), lr=LR)
        for _ in range(self.train_steps):
            idx = torch.randint(len(ends), (min(BATCH, len(ends)),), generator=gen)
            # L1: a burst in the training window must not drag the typical forecast with it.
            loss = nn.functional.l1_loss(net(inputs[idx]), residual[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        self._net = net.eval()
        self._buf.clear()
        self._buf.extend(float(v) for v in y[-(self.season + self.window):])

    def update(self, value: float) -> None:
        self._buf.append(max(float(value), 0.0))

    def predict(self, steps: int) -> np.ndarray:
        if self._net is None:
            raise RuntimeError("lstm: fit() before predict()")
        x = np.asarray(self._buf) / self._scale
        end = np.array([len(x) - 1])
        with torch.no_grad():
            inputs = torch.tensor(self._inputs(x, end), dtype=torch.float32)
            out = self._net(inputs).numpy()[0] + self._baseline(x, end)[0]
        # Beyond the trained horizon, hold the last step (the autoscaler asks for <= horizon).
        path = np.concatenate([out, np.full(max(0, steps - self.horizon), out[-1])])[:steps]
        return np.maximum(path * self._scale, 0.0)
