"""The ServerApp: runs beside the SuperLink in the cloud, aggregates the sites' updates and
closes the loop.

Round 0 has every site evaluate the starting model; rounds 1..N train (FedAvg or FedProx, with
client-side DP or SecAgg+ when asked) and evaluate. The final model is saved as a checkpoint
and, when it beats the start on every site's held-out data, published as a canary
(``federation/publish.py``). Outputs go to absolute paths from the run config: the ServerApp
runs in the SuperLink's working directory.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from pathlib import Path
from typing import TypedDict

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAvg,
    FedProx,
    Strategy,
)

from federation.config import FedRunConfig
from federation.publish import (
    compare_sites,
    publish_candidate,
    weighted_mean,
    write_calibration,
)
from federation.recording import STATUS_FILE, RecordingGrid, RunStatus
from federation.task import exchanged_state, package_entries
from model.checkpoint import checkpoint_version, load_checkpoint

log = logging.getLogger(__name__)
app = ServerApp()


class _Sampling(TypedDict):
    """The sampling arguments FedAvg and FedProx share."""

    fraction_train: float
    min_train_nodes: int
    min_evaluate_nodes: int
    min_available_nodes: int


def build_strategy(cfg: FedRunConfig) -> Strategy:
    """FedAvg or FedProx over at least ``min_nodes``; wrapped for client-side DP when asked."""
    # A DP round must sample exactly the number of clients its noise is scaled for.
    common = _Sampling(fraction_train=1e-9 if cfg.dp else cfg.fraction_train,
                       min_train_nodes=cfg.min_nodes, min_evaluate_nodes=cfg.min_nodes,
                       min_available_nodes=cfg.min_nodes)
    strategy: Strategy = (FedProx(proximal_mu=cfg.proximal_mu, **common)
                          if cfg.strategy == "fedprox" else FedAvg(**common))
    if cfg.dp:
        strategy = DifferentialPrivacyClientSideFixedClipping(
            strategy, noise_multiplier=cfg.dp_noise_multiplier,
            clipping_norm=cfg.dp_clipping_norm, num_sampled_clients=cfg.min_nodes)
    return strategy


def _watchdog(cfg: FedRunConfig, status: RunStatus) -> threading.Timer:
    """Past the run's deadline, record why and end the process: Flower marks the run failed
    and the SuperLink is free for the next one."""
    def expire() -> None:
        log.error("run %d passed its deadline of %.0f s; stopping", status.run_id,
                  cfg.deadline_s)
        status.finish("failed", f"deadline of {cfg.deadline_s:.0f} s passed (nodes missing "
                                f"or too slow; min-nodes {cfg.min_nodes})")
        os._exit(3)

    timer = threading.Timer(cfg.deadline_s, expire)
    timer.daemon = True
    timer.start()
    return timer


@app.main()
def main(grid: Grid, context: Context) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                                                   "%(message)s")
    cfg = FedRunConfig.from_run_config(dict(context.run_config))
    run_dir = cfg.out_dir / str(context.run_id)
    base_version = checkpoint_version(cfg.base_checkpoint)
    status = RunStatus(run_dir / STATUS_FILE, context.run_id, dict(context.run_config),
                       base_version)
    status.save()
    timer = _watchdog(cfg, status)
    try:
        _run(grid, context, cfg, status, run_dir, base_version)
    except Exception as e:
        log.exception("federated run %d failed", context.run_id)
        status.finish("failed", f"{type(e).__name__}: {e}")
        raise
    finally:
        timer.cancel()


def _run(grid: Grid, context: Context, cfg: FedRunConfig, status: RunStatus, run_dir: Path,
         base_version: str) -> None:
    from federation.lora import add_lora

    start_model = load_checkpoint(cfg.base_checkpoint, dtype="float32")
    if cfg.exchange.kind == "lora":
        add_lora(start_model, cfg.exchange.lora_rank, cfg.exchange.lora_alpha,
                 cfg.exchange.seed)
    initial = ArrayRecord(exchanged_state(start_model, cfg.exchange))
    recording = RecordingGrid(grid, status, package_entries(cfg.base_checkpoint, cfg.exchange))
    round_config = cfg.round_config(base_version)
    strategy = build_strategy(cfg)
    if cfg.secagg:
        from federation.secagg import run_secagg

        final = run_secagg(recording, context, cfg, initial, round_config)
    else:
        # Round 0: every site measures the starting model, the baseline the result must beat.
        recording.send_and_receive(
            strategy.configure_evaluate(0, initial, ConfigRecord(round_config), recording),
            timeout=cfg.round_timeout_s)
        result = strategy.start(
            grid=recording, initial_arrays=initial, num_rounds=cfg.rounds,
            timeout=cfg.round_timeout_s, train_config=ConfigRecord(round_config),
            evaluate_config=ConfigRecord(round_config))
        final = result.arrays
    _close_loop(cfg, status, run_dir, base_version, final, start_model)


def _close_loop(cfg: FedRunConfig, status: RunStatus, run_dir: Path, base_version: str,
                final: ArrayRecord | None, model) -> None:  # type: ignore[no-untyped-def]
    """Save the final model; publish and canary it when it beats the start on every site."""
    from federation.lora import load_lora_state, merge_lora
    from model.checkpoint import save_checkpoint

    if final is None or not len(final):
        status.finish("failed", "no round produced an aggregate (no site answered in time)")
        return
    state = final.to_torch_state_dict()
    if cfg.exchange.kind == "lora":
        load_lora_state(model, state)
        merge_lora(model)
    else:
        model.load_state_dict(state, strict=False)
        model.tie_weights()
    last = max((r["round"] for r in status.rounds if "evaluate" in r), default=0)
    comparison = compare_sites(status.site_metric(0, "eval-ppl"),
                               status.site_metric(last, "eval-ppl"), cfg.min_nodes)
    quantiles = status.site_metric(last, "difficulty-quantile")
    weights = status.site_metric(last, "num-examples")
    threshold = weighted_mean(quantiles, weights)
    checkpoint = save_checkpoint(
        model, run_dir / "checkpoint", tokenizer_dir=cfg.base_checkpoint,
        metadata={"name": "fed-edge", "role": "edge", "parent_version": base_version,
                  "federated_run": status.run_id, "rounds": cfg.rounds,
                  "heldout_perplexity_per_site": comparison.final},
        dtype="float32")
    if math.isfinite(threshold):
        write_calibration(checkpoint, threshold, cfg.calibration_quantile, quantiles)
    log.info("federated run %d: %s", status.run_id, comparison.reason)
    outcome: dict[str, object] = {"checkpoint": str(checkpoint), "comparison":
                                  comparison.to_dict(), "difficulty_threshold": threshold}
    if cfg.control_dir is None:
        status.finish("finished", **outcome, published=None,
                      publish_skipped="no control-dir in the run config")
    elif not comparison.better:
        status.finish("finished", **outcome, published=None,
                      publish_skipped=f"kept the current version: {comparison.reason}")
    else:
        published = publish_candidate(
            checkpoint, cfg.control_dir, run_dir, quantization=cfg.quantization,
            comparison=comparison, run_id=status.run_id, canary_fraction=cfg.canary_fraction)
        status.finish("finished", **outcome, **published)


