"""``tandem rollout start|status|promote|abort``: canary rollouts of edge model versions.

The commands open the control plane's data directory (``--data-dir``, env TANDEM_CONTROL_DIR)
like ``tandem cloud token create``, rather than calling an admin RPC: the operator is on the
control host anyway, there is no admin credential to issue and guard, and every change is one
SQLite transaction that the serving control plane sees at its next heartbeat or tick (WAL lets
both processes use the database at once). The verdict uses the thresholds the running server
saved (``rollout-config.json``), so ``status`` says what the server's next tick will do.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from typing import Any

# Shared with the other control-plane commands: one notion of data directory and of errors.
from tandem.commands.control_dir import ago, data_dir, data_dir_flag, guarded, when


def register(groups: Any) -> None:
    rollout = groups.add_parser("rollout", help="canary rollouts of edge model versions")
    sub = rollout.add_subparsers(dest="command", metavar="ACTION", required=True)
    start = sub.add_parser("start", help="send a published version to a canary fraction of "
                                         "the live nodes")
    start.add_argument("version", metavar="VERSION", help="as `tandem model versions` lists it")
    start.add_argument("--fraction", type=float, default=None,
                       help="share of live nodes to canary, rounded up, at least one "
                            "(default 0.2)")
    data_dir_flag(start)
    start.set_defaults(func=cmd_start)
    status = sub.add_parser("status", help="the rollout in canary: canaries, numbers, verdict")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    data_dir_flag(status)
    status.set_defaults(func=cmd_status)
    for name, verb in (("promote", "move every node to the canary version now"),
                       ("abort", "end the rollout; canaries return to the fleet's version")):
        action = sub.add_parser(name, help=verb)
        action.add_argument("--reason", default="", help="kept with the decision")
        data_dir_flag(action)
        action.set_defaults(func=cmd_decide, decision=name)


def _controller(args: argparse.Namespace) -> Any:
    """A controller over the data directory, with the serving control plane's thresholds."""
    from control.datadir import ControlData
    from control.rollout import RolloutConfig, RolloutController

    root = data_dir(args)
    data = ControlData.open(root)
    return data, RolloutController(data.store, RolloutConfig.load(root))


def cmd_start(args: argparse.Namespace) -> int:
    def start() -> int:
        data, controller = _controller(args)
        with data:
            rollout = controller.start(args.version, args.fraction)
            live = len(controller.live_nodes())
        print(f"rollout {rollout.rollout_id}: {rollout.version} to {len(rollout.canary_node_ids)}"
              f" of {live} live node(s): {', '.join(rollout.canary_node_ids)}")
        print(f"The rest of the fleet stays on {rollout.previous_version or 'nothing'}. "
              "Watch it with `tandem rollout status`; the control plane promotes or rolls back "
              "on its own.")
        return 0

    return guarded(start)


def cmd_status(args: argparse.Namespace) -> int:
    data, controller = _controller(args)
    with data:
        verdict = controller.evaluate()
        history = data.store.rollouts()
    last = history[-1] if history else None
    if args.json:
        print(json.dumps({
            "verdict": verdict.to_dict(),
            "last_rollout": None if last is None else asdict(last),
            "thresholds": asdict(controller.config),
        }, indent=2))
        return 0
    now = time.time()
    rollout = verdict.rollout
    if rollout is None:
        print("no rollout in canary")
        if last is not None:
            print(f"last: rollout {last.rollout_id} of {last.version} {last.state} "
                  f"{ago(last.decided_at, now)}: {last.reason}")
        return 0
    print(f"rollout {rollout.rollout_id}: {rollout.version} replacing "
          f"{rollout.previous_version or 'nothing'}, started {when(rollout.started_at)} "
          f"({ago(rollout.started_at, now)})")
    print(f"canaries: {', '.join(rollout.canary_node_ids)} (fraction {rollout.fraction:g})")
    print(f"\n{'SIDE':<9} {'VERSION':<28} {'REQUESTS':>8} {'ERRORS':>7} {'ESCAL.':>7} "
          f"{'P50 ms':>7} {'P99 ms':>7}  NODES")
    for name, side in (("canary", verdict.canary), ("baseline", verdict.baseline)):
        if side is not None:
            print(f"{name:<9} {side.version or '-':<28} {side.requests:>8} "
                  f"{side.error_rate:>7.1%} {side.escalation_rate:>7.1%} "
                  f"{side.latency_p50_ms:>7.0f} {side.latency_p99_ms:>7.0f}  "
                  f"{', '.join(side.nodes) or '-'}")
    for pending in verdict.pending:
        print(f"pending:  {pending}")
    print(f"\nverdict:  {verdict.action}: {verdict.reason}")
    return 0


def cmd_decide(args: argparse.Namespace) -> int:
    def decide() -> int:
        data, controller = _controller(args)
        with data:
            act = controller.promote if args.decision == "promote" else controller.abort
            rollout = act(args.reason)
        if rollout.state == "promoted":
            print(f"rollout {rollout.rollout_id}: {rollout.version} is now the fleet's version; "
                  "nodes move to it at their next heartbeat")
        else:
            print(f"rollout {rollout.rollout_id} aborted: canaries return to "
                  f"{rollout.previous_version or 'the fleet version'} at their next heartbeat")
        print(f"reason: {rollout.reason}")
        return 0

    return guarded(decide)
