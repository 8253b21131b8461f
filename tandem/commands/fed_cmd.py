"""``tandem fed run|status|site``: federated fine-tuning of the edge model with Flower.

``run`` submits a run to the SuperLink the control plane started (``tandem cloud control serve
--superlink-port``), starting from the checkpoint of the fleet's current edge version, and
follows it round by round; at its end the ServerApp publishes the result as a canary when it
beats the current version on every site. ``status`` shows rounds, nodes, losses and bytes.
``site`` fills a site's data directory from a family of the demo corpus.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from tandem.commands.control_dir import data_dir, data_dir_flag
from tandem.commands.flags import parse_duration


def register(groups: Any) -> None:
    fed = groups.add_parser("fed", help="federated fine-tuning of the edge model (Flower)")
    sub = fed.add_subparsers(dest="command", metavar="ACTION", required=True)

    run = sub.add_parser("run", help="start a federated run and follow it")
    run.add_argument("--rounds", type=int, default=3, help="federated rounds (default 3)")
    run.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY=VALUE",
                     help="override a run config value of federation/pyproject.toml, e.g. "
                          "--set exchange=lora --set dp-noise-multiplier=0.5 (repeatable)")
    run.add_argument("--checkpoint", type=Path, default=None, metavar="DIR",
                     help="start from this checkpoint (default: the one behind the fleet's "
                          "current edge version)")
    run.add_argument("--superlink", default=None, metavar="HOST:PORT",
                     help="the SuperLink (default: the one the control plane started)")
    run.add_argument("--root-cert", type=Path, default=None,
                     help="CA certificate of a TLS SuperLink given with --superlink")
    run.add_argument("--no-publish", action="store_true",
                     help="keep the result as a checkpoint; publish and canary nothing")
    run.add_argument("--detach", action="store_true", help="submit and return at once")
    run.add_argument("--deadline", type=parse_duration, default=3600.0, metavar="DURATION",
                     help="stop the run when it takes longer (default 1h)")
    data_dir_flag(run)
    run.set_defaults(func=cmd_run)

    status = sub.add_parser("status", help="rounds, nodes, losses and bytes of runs")
    status.add_argument("run_id", nargs="?", type=int, default=None, metavar="RUN_ID",
                        help="one run in detail (default: the latest)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    data_dir_flag(status)
    status.set_defaults(func=cmd_status)

    register = sub.add_parser(
        "register-node", help="let a SuperNode join a SuperLink that authenticates nodes")
    register.add_argument("public_key", type=Path, metavar="PUBLIC_KEY",
                          help="the node's OpenSSH public key (ssh-keygen -t ecdsa); the node "
                               "runs with `tandem edge run --fed-auth-key PRIVATE_KEY`")
    register.add_argument("--name", default="", help="how Flower lists the node")
    register.add_argument("--superlink", default=None, metavar="HOST:PORT")
    register.add_argument("--root-cert", type=Path, default=None)
    data_dir_flag(register)
    register.set_defaults(func=cmd_register)

    site = sub.add_parser("site", help="fill a site's data directory from the demo corpus")
    site.add_argument("--family", required=True,
                      help="module family of the demo corpus (one per site: non-IID)")
    site.add_argument("--data-path", type=Path, required=True, metavar="DIR",
                      help="the site directory (a SuperNode's data-path)")
    site.add_argument("--name", default=None, help="how results name the site")
    site.set_defaults(func=cmd_site)


def _cli(args: argparse.Namespace, control_dir: Path) -> Any:
    from federation.runner import FLOWER_DIR, FlowerCli, LinkInfo

    if args.superlink:
        link = LinkInfo(args.superlink, str(args.root_cert.resolve()) if args.root_cert else "")
    else:
        link = LinkInfo.load(control_dir)
    return FlowerCli(link, control_dir / FLOWER_DIR / "cli")


def base_checkpoint(control_dir: Path, given: Path | None) -> Path:
    """The checkpoint a run starts from: given, or the one behind the fleet's version."""
    from control.datadir import ControlData
    from federation.publish import find_checkpoint
    from model.demo import DEMO_DIR

    if given is not None:
        return given.expanduser().resolve()
    with ControlData.open(control_dir) as data:
        current = data.store.current_version()
        record = data.store.version(current) if current else None
    if record is None:
        raise FileNotFoundError("the fleet has no edge version yet; publish one "
                                "(`tandem model publish`) or pass --checkpoint")
    found = find_checkpoint(control_dir, record.base_version, [DEMO_DIR / "edge"])
    if found is None:
        raise FileNotFoundError(
            f"no checkpoint of {record.base_version} (behind {current}) in "
            f"{control_dir}/checkpoints; pass the one it was exported from with --checkpoint")
    return found.resolve()


def cmd_run(args: argparse.Namespace) -> int:
    from federation.runner import parse_override, runs_dir, wait_for_run

    control_dir = data_dir(args).resolve()
    config: dict[str, Any] = {"num-server-rounds": args.rounds}
    config.update(parse_override(o) for o in args.overrides)
    config.update({
        "base-checkpoint": str(base_checkpoint(control_dir, args.checkpoint)),
        "out-dir": str(runs_dir(control_dir)),
        "control-dir": "" if args.no_publish else str(control_dir),
        "deadline": float(config.get("deadline", args.deadline)),
    })
    from federation.config import FedRunConfig

    # A typo or a bad value fails here, in one line, not in the ServerApp's log.
    FedRunConfig.from_run_config(config)
    cli = _cli(args, control_dir)
    try:
        run_id = cli.submit(config)
    except (RuntimeError, OSError) as e:  # the SuperLink refused or is unreachable
        print(f"tandem: error: {e}", file=sys.stderr)
        return 1
    from model.checkpoint import checkpoint_version

    print(f"run {run_id} submitted to {cli.link.address}: {args.rounds} round(s) from "
          f"{checkpoint_version(config['base-checkpoint'])}", flush=True)
    if args.detach:
        print(f"follow it with `tandem fed status {run_id}`")
        return 0
    printed: set[tuple[int, str]] = set()

    def progress(status: dict[str, Any]) -> None:
        for row in status.get("rounds", []):
            for phase in ("train", "evaluate"):
                if phase in row and (row["round"], phase) not in printed:
                    printed.add((row["round"], phase))
                    print(_phase_line(row["round"], phase, row[phase]), flush=True)

    # The ServerApp ends itself at the run's deadline; the margin covers publishing.
    status = wait_for_run(cli, control_dir, run_id, float(config["deadline"]) + 300, progress)
    _print_result(status)
    return 0 if status.get("state") == "finished" else 1


def _phase_line(server_round: int, phase: str, entry: dict[str, Any]) -> str:
    key = "train-loss" if phase == "train" else "eval-ppl"
    # Stages of secure aggregation carry no metrics: only nodes that reported are shown.
    reported = sorted((n for n in entry["nodes"].values() if key in n and "site" in n),
                      key=lambda n: n["site"])
    sites = ", ".join(f"{n['site']} {n[key]:.2f}" for n in reported) or "-"
    fails = f"; {len(entry['failures'])} failed" if entry.get("failures") else ""
    what = "loss" if phase == "train" else "held-out ppl"
    return (f"round {server_round} {phase:<8} {entry['answered']}/{entry['sampled']} nodes "
            f"{entry['seconds']:6.1f} s  {_mb(entry['sent_bytes'])} out "
            f"{_mb(entry['received_bytes'])} in  {what}: {sites}{fails}")


def _mb(n: float) -> str:
    return f"{n / 1e6:6.2f} MB"


def _print_result(status: dict[str, Any]) -> None:
    result = status.get("result", {})
    print(f"\nrun {status.get('run_id')}: {status.get('state')}"
          + (f": {status['error']}" if status.get("error") else ""))
    comparison = result.get("comparison")
    if comparison:
        print(f"  {comparison['reason']}")
    if result.get("difficulty_threshold") is not None:
        print(f"  router difficulty threshold for the new version: "
              f"{result['difficulty_threshold']:.3f}")
    if result.get("published"):
        canaries = ", ".join(result.get("canaries") or []) or "none"
        print(f"  published {result['published']}; rollout {result.get('rollout')} on "
              f"{canaries} (watch: `tandem rollout status`)")
        if result.get("rollout_error"):
            print(f"  rollout not started: {result['rollout_error']}")
    elif result.get("publish_skipped"):
        print(f"  not published: {result['publish_skipped']}")
    if result.get("checkpoint"):
        print(f"  checkpoint: {result['checkpoint']}")


def cmd_status(args: argparse.Namespace) -> int:
    from federation.runner import all_statuses, run_status

    control_dir = data_dir(args)
    if args.run_id is not None:
        status = run_status(control_dir, args.run_id)
        if status is None:
            raise FileNotFoundError(f"no run {args.run_id} recorded in {control_dir}")
        statuses = [status]
    else:
        statuses = all_statuses(control_dir)
    if args.json:
        print(json.dumps(statuses if args.run_id is None else statuses[0], indent=1))
        return 0
    if not statuses:
        print("no federated run yet; start one with `tandem fed run`")
        return 0
    if args.run_id is None and len(statuses) > 1:
        print(f"{'RUN':<22} {'STATE':<9} {'STARTED':<20} ROUNDS  RESULT")
        for s in statuses:
            rounds = max((r["round"] for r in s.get("rounds", [])), default=0)
            result = s.get("result", {})
            outcome = result.get("published") or result.get("publish_skipped") or \
                s.get("error") or "-"
            print(f"{s['run_id']:<22} {s['state']:<9} "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(s['started_at'])):<20} "
                  f"{rounds:>6}  {str(outcome)[:60]}")
        print()
    latest = statuses[-1]
    print(f"run {latest['run_id']} ({latest['state']}), from {latest['base_version']}")
    for row in latest.get("rounds", []):
        for phase in ("train", "evaluate"):
            if phase in row:
                print("  " + _phase_line(row["round"], phase, row[phase]))
    if latest["state"] != "running":
        _print_result(latest)
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    control_dir = data_dir(args).resolve()
    out = _cli(args, control_dir).register_supernode(args.public_key, args.name)
    print(f"registered {args.public_key} ({out.get('node-id', 'pending')}); the node joins "
          "with its private key")
    return 0


def cmd_site(args: argparse.Namespace) -> int:
    from federation.sitedata import read_site, write_corpus_site

    path = write_corpus_site(args.data_path, args.family, args.name)
    site = read_site(path)
    print(f"site {site.name} in {path}: {len(site.train)} training and {len(site.heldout)} "
          f"held-out documents, {len(site.escalations)} escalations")
    return 0
