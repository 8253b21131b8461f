"""A federated run's configuration: the Flower run config (kebab-case keys, defaults in
``federation/pyproject.toml``, overridden with ``tandem fed run --set KEY=VALUE``) read once
into a frozen dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federation.task import Exchange, LocalTraining

STRATEGIES = ("fedavg", "fedprox")


@dataclass(frozen=True)
class FedRunConfig:
    """Everything the ServerApp decides a run by."""

    rounds: int = 3
    strategy: str = "fedavg"
    proximal_mu: float = 0.01  # FedProx only
    exchange: Exchange = dataclasses.field(default_factory=Exchange)
    local: LocalTraining = dataclasses.field(default_factory=LocalTraining)
    # Nodes a round needs (available, trained, evaluated): fewer results than sampled are
    # fine as long as this many answer; a run never starts with fewer.
    min_nodes: int = 2
    fraction_train: float = 1.0
    # A round's messages are abandoned after this (a node that died mid-round answers never).
    round_timeout_s: float = 600.0
    # The whole run, waiting for nodes included: past it the ServerApp records the failure
    # and exits, so a run waiting for nodes that never come back does not wait forever.
    deadline_s: float = 3600.0
    # Client-side differential privacy (clipping on each site, Gaussian noise on the
    # aggregate): on when noise_multiplier > 0.
    dp_noise_multiplier: float = 0.0
    dp_clipping_norm: float = 1.0
    # Secure aggregation (SecAgg+): the server sees only the sum of masked updates.
    secagg: bool = False
    secagg_shares: int = 3
    secagg_threshold: int = 2
    escalation_repeat: int = 4
    eval_seq_len: int = 128
    # The router's difficulty threshold for the new version: this quantile of the prompt
    # loss on the sites' own held-out documents, averaged over sites.
    calibration_quantile: float = 0.9
    base_checkpoint: Path = Path()
    out_dir: Path = Path()
    # The control plane's data directory: where the result is published and canaried;
    # empty: keep the checkpoint, publish nothing.
    control_dir: Path | None = None
    quantization: str = "int4"
    canary_fraction: float = 0.0  # 0: the control plane's configured fraction

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.min_nodes < 1:
            raise ValueError(f"min-nodes must be >= 1, got {self.min_nodes}")
        if self.secagg and self.min_nodes < 3:
            raise ValueError("secure aggregation (SecAgg+) needs min-nodes >= 3")
        if self.secagg and self.exchange.kind != "full":
            raise ValueError("secure aggregation runs exchange full weights (exchange=full)")
        if not str(self.base_checkpoint) or not Path(self.base_checkpoint).is_absolute():
            raise ValueError("base-checkpoint must be an absolute path on the SuperLink host "
                             f"(got {str(self.base_checkpoint)!r}); `tandem fed run` sets it")
        if not Path(self.out_dir).is_absolute():
            raise ValueError("out-dir must be an absolute path on the SuperLink host (got "
                             f"{str(self.out_dir)!r}); `tandem fed run` sets it")

    @property
    def dp(self) -> bool:
        return self.dp_noise_multiplier > 0

    @classmethod
    def from_run_config(cls, run: dict[str, Any]) -> FedRunConfig:
        """Read Flower's run config (unknown keys are an error: a typo must not be ignored)."""
        known = {"num-server-rounds", "strategy", "proximal-mu", "exchange", "lora-rank",
                 "lora-alpha", "local-steps", "batch-size", "seq-len", "lr", "seed",
                 "min-nodes", "fraction-train", "round-timeout", "deadline",
                 "dp-noise-multiplier", "dp-clipping-norm", "secagg", "secagg-shares",
                 "secagg-threshold", "escalation-repeat", "eval-seq-len",
                 "calibration-quantile", "base-checkpoint", "out-dir", "control-dir",
                 "quantization", "canary-fraction"}
        unknown = sorted(set(run) - known)
        if unknown:
            raise ValueError(f"unknown run config keys {unknown}; known: {sorted(known)}")
        get = run.get
        seed = int(get("seed", 0))
        control = str(get("control-dir", ""))
        return cls(
            rounds=int(get("num-server-rounds", 3)),
            strategy=str(get("strategy", "fedavg")),
            proximal_mu=float(get("proximal-mu", 0.01)),
            exchange=Exchange(str(get("exchange", "full")), int(get("lora-rank", 8)),
                              float(get("lora-alpha", 16.0)), seed),
            local=LocalTraining(int(get("local-steps", 20)), int(get("batch-size", 8)),
                                int(get("seq-len", 128)), float(get("lr", 5e-4)), seed=seed),
            min_nodes=int(get("min-nodes", 2)),
            fraction_train=float(get("fraction-train", 1.0)),
            round_timeout_s=float(get("round-timeout", 600.0)),
            deadline_s=float(get("deadline", 3600.0)),
            dp_noise_multiplier=float(get("dp-noise-multiplier", 0.0)),
            dp_clipping_norm=float(get("dp-clipping-norm", 1.0)),
            secagg=bool(get("secagg", False)),
            secagg_shares=int(get("secagg-shares", 3)),
            secagg_threshold=int(get("secagg-threshold", 2)),
            escalation_repeat=int(get("escalation-repeat", 4)),
            eval_seq_len=int(get("eval-seq-len", 128)),
            calibration_quantile=float(get("calibration-quantile", 0.9)),
            base_checkpoint=Path(str(get("base-checkpoint", ""))),
            out_dir=Path(str(get("out-dir", ""))),
            control_dir=Path(control) if control else None,
            quantization=str(get("quantization", "int4")),
            canary_fraction=float(get("canary-fraction", 0.0)),
        )

    def round_config(self, base_version: str) -> dict[str, Any]:
        """What every site needs to train and evaluate (sent in each message's config)."""
        return {
            "base-version": base_version,
            "exchange": self.exchange.kind, "lora-rank": self.exchange.lora_rank,
            "lora-alpha": self.exchange.lora_alpha, "seed": self.exchange.seed,
            "local-steps": self.local.steps, "batch-size": self.local.batch_size,
            "seq-len": self.local.seq_len, "lr": self.local.lr,
            "escalation-repeat": self.escalation_repeat, "eval-seq-len": self.eval_seq_len,
            "calibration-quantile": self.calibration_quantile,
        }

