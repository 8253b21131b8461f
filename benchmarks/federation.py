"""Federated fine-tuning of the demo edge model, against its baselines, measured in one run.

Three sites, each holding one family of the demo corpus (non-IID), each measured on its own
held-out documents:

  (a) start        the shipped demo edge model
  (b) local-only   each site fine-tunes alone, as many steps as its federated share (also
                   measured on the other sites' held-out data: what specialising costs)
  (c) federated    a real deployment: a SuperLink and three SuperNodes (Flower processes on
                   loopback), FedAvg over R rounds, full weights and LoRA adapters
  (d) centralized  one model on the pooled training data, the same total steps (upper bound)

plus, from the federated runs' own records, seconds and bytes per round per client.

    python benchmarks/federation.py --rounds 3 --local-steps 30 --out runs/federation.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a script, this file's directory comes first on sys.path, and the file shares its
# name with the package it measures: take the directory out so `federation` is the package.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import torch

from core.launcher import free_port
from federation.processes import (
    SuperLinkConfig,
    SuperNodeConfig,
    superlink_process,
    supernode_process,
)
from federation.recording import STATUS_FILE
from federation.runner import FlowerCli, LinkInfo
from federation.sitedata import read_site, write_corpus_site
from federation.task import LocalTraining, heldout_loss, tokenize_site, train_locally
from model.checkpoint import load_checkpoint
from model.demo import DEMO_DIR
from model.tokenizer import Tokenizer

log = logging.getLogger("benchmarks.federation")
SITES = ("text", "numeric", "concurrency")
CHECKPOINT = DEMO_DIR / "edge"


def site_ppl(model: torch.nn.Module, tokens: dict[str, Any], seq_len: int) -> dict[str, float]:
    return {s: math.exp(heldout_loss(model, t.heldout, seq_len)[0]) for s, t in tokens.items()}


def in_process_baselines(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    tokenizer = Tokenizer.from_dir(CHECKPOINT)
    tokens = {s: tokenize_site(read_site(root / s), tokenizer) for s in SITES}
    cfg = LocalTraining(args.local_steps * args.rounds, args.batch_size, args.seq_len, args.lr)
    start = site_ppl(load_checkpoint(CHECKPOINT, dtype="float32"), tokens, args.eval_seq_len)
    local, local_elsewhere = {}, {}
    for s in SITES:  # each site alone: on its own held-out data, and on the other sites'
        model = load_checkpoint(CHECKPOINT, dtype="float32")
        train_locally(model, tokens[s].train, cfg)
        everywhere = site_ppl(model, tokens, args.eval_seq_len)
        local[s] = everywhere[s]
        local_elsewhere[s] = {t: v for t, v in everywhere.items() if t != s}
    pooled = torch.cat([tokens[s].train for s in SITES])
    model = load_checkpoint(CHECKPOINT, dtype="float32")
    t0 = time.perf_counter()
    train_locally(model, pooled, LocalTraining(cfg.steps * len(SITES), args.batch_size,
                                               args.seq_len, args.lr))
    central_s = time.perf_counter() - t0
    central = site_ppl(model, tokens, args.eval_seq_len)
    return {"start": start, "local_only": local, "local_only_on_other_sites": local_elsewhere,
            "centralized": central,
            "centralized_seconds": central_s,
            "train_tokens": {s: int(tokens[s].train.numel()) for s in SITES}}


def federated(root: Path, work: Path, exchange: str, args: argparse.Namespace
              ) -> dict[str, Any]:
    """One run on a fresh SuperLink and three SuperNodes; its per-site and per-round numbers."""
    link = SuperLinkConfig(state_dir=work / "superlink", port=free_port())
    processes = [superlink_process(link).start()]
    try:
        processes[0].wait_healthy(60)
        for s in SITES:
            processes.append(supernode_process(SuperNodeConfig(
                superlink=link.address, data_path=root / s, state_dir=work / f"node-{s}",
                port=free_port())).start())
        for p in processes[1:]:
            p.wait_healthy(60)
        cli = FlowerCli(LinkInfo(link.address), work / "cli")
        out_dir = work / "runs"
        run_id = cli.submit({
            "num-server-rounds": args.rounds, "local-steps": args.local_steps,
            "batch-size": args.batch_size, "seq-len": args.seq_len, "lr": args.lr,
            "exchange": exchange, "min-nodes": len(SITES), "eval-seq-len": args.eval_seq_len,
            "base-checkpoint": str(CHECKPOINT.resolve()), "out-dir": str(out_dir)})
        status = _wait(cli, out_dir, run_id)
        info = cli.run_info(run_id) or {}
    finally:
        for p in reversed(processes):
            p.stop()
    if status["state"] != "finished":
        return {"state": status["state"], "error": status.get("error", ""), "per_site": {}}
    rounds = [r for r in status["rounds"] if r["round"] >= 1]
    per_client = [
        {"round": r["round"], "phase": phase, "seconds": r[phase]["seconds"],
         "sent_bytes_per_client": r[phase]["sent_bytes"] / max(1, r[phase]["sampled"]),
         "received_bytes_per_client": r[phase]["received_bytes"] / max(1, r[phase]["answered"])}
        for r in rounds for phase in ("train", "evaluate") if phase in r]
    last = max(r["round"] for r in rounds)

    def ppl(server_round: int) -> dict[str, float]:
        row = next(r for r in status["rounds"] if r["round"] == server_round)
        return {n["site"]: n["eval-ppl"] for n in row["evaluate"]["nodes"].values()}

    return {"state": status["state"], "per_site": ppl(last), "start_per_site": ppl(0),
            "phases": per_client,
            "round_seconds_median": statistics.median(
                sum(p["seconds"] for p in per_client if p["round"] == r["round"])
                for r in rounds),
            "train_up_bytes_per_client": statistics.median(
                p["received_bytes_per_client"] for p in per_client if p["phase"] == "train"),
            "train_down_bytes_per_client": statistics.median(
                p["sent_bytes_per_client"] for p in per_client if p["phase"] == "train"),
            "flower_network_bytes": info.get("network-traffic", {}),
            "difficulty_threshold": status["result"].get("difficulty_threshold")}


def _wait(cli: FlowerCli, out_dir: Path, run_id: int) -> dict[str, Any]:
    end = time.monotonic() + 3600
    while True:
        status = _read(out_dir / str(run_id) / STATUS_FILE)
        if status and status.get("state") in ("finished", "failed"):
            return status
        info = cli.run_info(run_id)
        if info and str(info.get("status", "")).startswith("finished") and not status:
            raise RuntimeError(f"run {run_id} ended without a record: {info}")
        if time.monotonic() > end:
            cli.stop(run_id)
            raise TimeoutError(f"run {run_id} did not finish in an hour")
        time.sleep(2)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--exchanges", default="full,lora")
    parser.add_argument("--out", type=Path, default=Path("runs/federation.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="tandem-fed-bench-") as tmp:
        root = Path(tmp) / "sites"
        for s in SITES:
            write_corpus_site(root / s, s)
        result: dict[str, Any] = {
            "machine": f"{platform.processor() or platform.machine()}, "
                       f"{torch.get_num_threads()} threads, Python {platform.python_version()}",
            "config": vars(args) | {"out": str(args.out)}, "sites": SITES}
        result |= in_process_baselines(root, args)
        for exchange in args.exchanges.split(","):
            result[f"federated_{exchange}"] = federated(root, Path(tmp) / exchange, exchange,
                                                        args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(f"{'site':<12} {'start':>8} {'local':>8} " + " ".join(
        f"{'fed-' + e:>9}" for e in args.exchanges.split(",")) + f" {'central':>8}")
    for s in SITES:
        fed = " ".join(f"{result['federated_' + e]['per_site'].get(s, math.nan):>9.2f}"
                       for e in args.exchanges.split(","))
        print(f"{s:<12} {result['start'][s]:>8.2f} {result['local_only'][s]:>8.2f} {fed} "
              f"{result['centralized'][s]:>8.2f}")
    for e in args.exchanges.split(","):
        r = result[f"federated_{e}"]
        if r["state"] != "finished":
            print(f"{e}: {r['state']}: {r['error']}")
            continue
        print(f"{e}: round {r['round_seconds_median']:.1f} s (median), train up "
              f"{r['train_up_bytes_per_client'] / 1e6:.2f} MB / down "
              f"{r['train_down_bytes_per_client'] / 1e6:.2f} MB per client per round")


if __name__ == "__main__":
    main()
